"""A supervisor's record of one child: state, restart counters, the start handshake.

It doubles as the child's `LaunchContext` and, for async functions taking ``task_status``, as
their trio-style task status, so a restart allocates nothing for them.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from supervise.runtime._log import log
from supervise.runtime.backoff import Backoff
from supervise.runtime.exit import ExitReason
from supervise.runtime.spec import ChildInfo, ChildSpec, ChildState, Launchable

if TYPE_CHECKING:
    from supervise.runtime._core import Core


RUNNING = ChildState.RUNNING
RESTARTING = ChildState.RESTARTING
STOPPED = ChildState.STOPPED


def wants_task_status(fn: Callable[..., Any]) -> bool:
    """Whether an async function child takes trio's ``task_status`` (started when it says)."""
    try:
        return "task_status" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without signatures
        return False


class Waiter:
    """Start handshake: resolved with None once the child reported started, or with the exit
    reason if it ended before that."""

    __slots__ = ("_event", "result")

    def __init__(self) -> None:
        self._event = trio.Event()
        self.result: ExitReason | None = None

    def resolve(self, failure: ExitReason | None) -> None:
        if not self._event.is_set():
            self.result = failure
            self._event.set()

    async def wait(self) -> ExitReason | None:
        await self._event.wait()
        return self.result


class Child:
    """A supervisor's record of one child (see the module docstring)."""

    __slots__ = (
        "active",
        "args",
        "consecutive",
        "core",
        "done",
        "fn",
        "generation",
        "id",
        "is_restart",
        "kwargs",
        "launch",
        "path",
        "ref",
        "restart",
        "restarts",
        "scope",
        "spec",
        "started_at",
        "state",
        "stopping",
        "takes_status",
        "up",
        "waiter",
    )

    def __init__(self, spec: ChildSpec, core: Core) -> None:
        self.spec = spec
        self.core = core
        self.id = spec.id
        self.path = f"{core.path}/{spec.id}"
        self.restart = spec.restart
        self.args = spec.args
        self.kwargs = spec.kwargs
        launch = spec.target if isinstance(spec.target, Launchable) else None
        self.launch: Launchable | None = launch
        self.fn: Callable[..., Awaitable[Any]] | None = None if launch is not None else spec.target
        self.takes_status = self.fn is not None and wants_task_status(self.fn)
        self.state = STOPPED
        self.restarts = 0  # restarts so far (which_children)
        self.consecutive = 0  # restarts since the child last ran `backoff.reset_after`
        self.started_at = 0.0
        self.generation = 0  # incarnations so far: stale group-restart requests are ignored
        self.active = False  # a runner task exists
        self.up = False  # the current incarnation reported started
        self.stopping = False  # the supervisor is stopping it: its exit is expected
        self.is_restart = False
        self.ref: Any = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.waiter: Waiter | None = None

    def started(self, value: object = None) -> None:
        """The incarnation is up (trio's ``task_status.started`` for function children)."""
        if self.up:
            raise RuntimeError(f"child {self.id!r} reported started twice")
        self.up = True
        self.ref = value
        self.state = RUNNING
        self.started_at = trio.current_time()
        if self.is_restart:
            self.is_restart = False
            log.info(
                "child_restarted", supervisor=self.core.path, child=self.id, restarts=self.restarts
            )
        else:
            log.info("child_started", supervisor=self.core.path, child=self.id)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.resolve(None)

    def backoff_delay(self, backoff: Backoff | None, now: float) -> float:
        """Seconds to wait before restarting it now (0 without a backoff); counts the restart
        as consecutive unless the incarnation that just ended ran ``reset_after``."""
        if backoff is None:
            return 0.0
        if self.up and backoff.should_reset(now - self.started_at):
            self.consecutive = 0
        self.consecutive += 1
        return backoff.delay(self.consecutive, random.random())

    def info(self) -> ChildInfo:
        return ChildInfo(
            self.id,
            self.state,
            self.restarts,
            self.spec.kind,
            self.ref if self.state is RUNNING else None,
        )
