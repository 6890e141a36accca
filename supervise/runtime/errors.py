"""Exceptions of the runtime: OTP's error tuples as exceptions, each with a one-line message."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervise.runtime.exit import ExitReason


class Shutdown(Exception):
    """Raise inside a child to exit with reason *shutdown*: transient children stay stopped."""


class GaveUp(Exception):
    """A supervisor exceeded its restart intensity, stopped all children and gave up.

    Chained (``__cause__``) to the failure that tipped it over; a parent supervisor sees it as
    the child's abnormal exit.
    """

    def __init__(self, supervisor: str, child_id: str, reason: ExitReason, limit: str) -> None:
        self.supervisor = supervisor
        self.child_id = child_id
        self.reason = reason
        super().__init__(
            f"supervisor {supervisor} gave up: child {child_id!r} exited ({reason}); {limit}"
        )
        self.__cause__ = _cause(child_id, reason)


class ChildFailed(Exception):
    """An abnormal exit that carries no exception of its own (an OS process's exit code or
    signal), so that `GaveUp` and `StartFailed` always have something to chain to."""

    def __init__(self, child_id: str, reason: ExitReason) -> None:
        self.child_id = child_id
        self.reason = reason
        super().__init__(f"child {child_id!r} exited ({reason})")


def _cause(child_id: str, reason: ExitReason) -> BaseException:
    """What a `GaveUp` or `StartFailed` is chained to: the child's exception, if it had one."""
    return reason.exception or ChildFailed(child_id, reason)


class SupervisorError(Exception):
    """Base of the management API's errors (OTP's ``{error, ...}`` replies)."""


class NotFound(SupervisorError, LookupError):
    """No child with that id (OTP: ``not_found``)."""

    def __init__(self, child_id: str) -> None:
        self.child_id = child_id
        super().__init__(f"no child with id {child_id!r}")


class AlreadyPresent(SupervisorError):
    """`start_child` with the id of a stopped child whose spec is kept (OTP: ``already_present``);
    use `restart_child` or `delete_child` first."""

    def __init__(self, child_id: str) -> None:
        self.child_id = child_id
        super().__init__(
            f"child {child_id!r} is already present (stopped): restart_child or delete_child it"
        )


class AlreadyRunning(SupervisorError):
    """The child is running or restarting (OTP: ``already_started`` / ``running`` /
    ``restarting``)."""

    def __init__(self, child_id: str, state: str = "running") -> None:
        self.child_id = child_id
        self.state = state
        super().__init__(f"child {child_id!r} is already {state}")


class StillRunning(SupervisorError):
    """`delete_child` of a child that is running or restarting (OTP: ``running``); terminate it
    first."""

    def __init__(self, child_id: str, state: str = "running") -> None:
        self.child_id = child_id
        self.state = state
        super().__init__(f"child {child_id!r} is still {state}: terminate_child it first")


class StartFailed(SupervisorError):
    """A child failed to start (before it reported started); chained (``__cause__``) to why."""

    def __init__(self, child_id: str, reason: ExitReason) -> None:
        self.child_id = child_id
        self.reason = reason
        why = str(reason) if reason.abnormal else f"it exited ({reason}) before it reported started"
        super().__init__(f"child {child_id!r} failed to start: {why}")
        self.__cause__ = _cause(child_id, reason)


class TooManyChildren(SupervisorError):
    """`DynamicSupervisor.start_child` beyond ``max_children`` (OTP: ``max_children``)."""

    def __init__(self, max_children: int) -> None:
        self.max_children = max_children
        super().__init__(f"dynamic supervisor already has max_children={max_children} children")


class NoProc(Exception):
    """The server or supervisor addressed is not running (OTP: ``noproc``)."""


class CallTimeout(TimeoutError):
    """`ServerRef.call` got no reply within its timeout."""


class AlreadyRegistered(Exception):
    """A name is already registered in this trio run (OTP: ``already_started``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"name {name!r} is already registered")
