"""Child specifications and what the management API reports about children."""

from __future__ import annotations

import enum
import inspect
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from supervise._validation import InvalidValue, enum_value

if TYPE_CHECKING:
    from supervise.runtime.exit import ExitReason


class Restart(enum.StrEnum):
    """When a child that exited is restarted."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit
    TEMPORARY = "temporary"  # never; its spec is dropped once it exits


class Strategy(enum.StrEnum):
    """Which children a restart affects."""

    ONE_FOR_ONE = "one_for_one"  # only the child that exited
    ONE_FOR_ALL = "one_for_all"  # all children: stop the others (reverse order), start all
    REST_FOR_ONE = "rest_for_one"  # the child and those started after it


class AutoShutdown(enum.StrEnum):
    """When the exit of *significant* children shuts the supervisor down (OTP 24+)."""

    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


class ChildState(enum.StrEnum):
    """A child's state as `which_children` reports it."""

    RUNNING = "running"
    RESTARTING = "restarting"  # exited, a restart is pending (backoff) or under way
    STOPPED = "stopped"


class LaunchContext(Protocol):
    """What a supervised target sees of its supervisor while it runs (internal seam)."""

    @property
    def spec(self) -> ChildSpec: ...

    @property
    def path(self) -> str: ...

    def started(self, value: object = None) -> None: ...


@runtime_checkable
class Launchable(Protocol):
    """A non-function target: `Server` subclasses, `Supervisor`, `DynamicSupervisor`,
    `OsProcess`. The runner awaits ``_supervise_launch``, which calls ``ctx.started(ref)`` once
    ready and returns the exit reason (or raises, which is an abnormal exit)."""

    _supervise_kind: str  # "worker" | "supervisor"
    _supervise_takes_args: bool  # Server subclasses take init arguments, instances do not
    _supervise_registers: bool  # whether `name=` registers it

    async def _supervise_launch(self, ctx: LaunchContext) -> ExitReason: ...


def _is_async_callable(target: object) -> bool:
    if inspect.iscoroutinefunction(target):
        return True
    call = getattr(target, "__call__", None)  # noqa: B004 (async __call__ objects)
    return call is not None and inspect.iscoroutinefunction(call)


def _launchable(target: object) -> Launchable | None:
    return target if isinstance(target, Launchable) else None


_TARGETS = "an async function, a Server subclass, a Supervisor, a DynamicSupervisor or an OsProcess"


def _check_id(_inst: ChildSpec, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidValue(attr.name, value, "must be a non-empty string")


def _convert_shutdown(value: float | None) -> float:
    return math.inf if value is None else value


def _check_shutdown(_inst: ChildSpec, attr: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidValue(attr.name, value, "must be seconds >= 0, or None for infinity")


def _default_shutdown(spec: ChildSpec) -> float:
    launch = _launchable(spec.target)
    return math.inf if launch is not None and launch._supervise_kind == "supervisor" else 5.0


def _restart(value: Restart | str) -> Restart:
    return enum_value(Restart, "restart", value)


def _check_bool(_inst: object, attr: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise InvalidValue(attr.name, value, "must be True or False")


@attrs.frozen(slots=True, eq=False)
class ChildSpec:
    """How to start one child and when to restart it. Build it with `child`."""

    id: str = attrs.field(validator=_check_id)
    target: Any
    args: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    kwargs: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    restart: Restart = attrs.field(default=Restart.PERMANENT, converter=_restart)
    shutdown: float = attrs.field(
        default=attrs.Factory(_default_shutdown, takes_self=True),
        converter=_convert_shutdown,
        validator=_check_shutdown,
    )
    significant: bool = attrs.field(default=False, validator=_check_bool)
    name: str | None = None

    def __attrs_post_init__(self) -> None:
        launch = _launchable(self.target)
        if launch is None and not _is_async_callable(self.target):
            raise InvalidValue("target", self.target, f"must be {_TARGETS}")
        takes_args = launch is None or launch._supervise_takes_args
        if not takes_args and (self.args or self.kwargs):
            raise InvalidValue(
                "args", self.args or self.kwargs, f"{type(self.target).__name__} takes no arguments"
            )
        if "task_status" in self.kwargs:
            raise InvalidValue("kwargs", "task_status", "is reserved: the supervisor passes it")
        if self.name is not None:
            if launch is None or not launch._supervise_registers:
                raise InvalidValue("name", self.name, "registers Servers and supervisors only")
            if not isinstance(self.name, str) or not self.name:
                raise InvalidValue("name", self.name, "must be a non-empty string")
        if self.significant and self.restart is Restart.PERMANENT:
            raise InvalidValue(
                "significant",
                True,
                "a permanent child cannot be significant (use transient or temporary)",
            )

    @property
    def kind(self) -> str:
        """``"supervisor"`` or ``"worker"`` (as OTP's child ``type``)."""
        launch = _launchable(self.target)
        return "worker" if launch is None else launch._supervise_kind


class _Default:
    def __repr__(self) -> str:
        return "<default>"


_DEFAULT: Any = _Default()


def child(
    target: Any,
    *args: Any,
    id: str,
    restart: Restart | str = Restart.PERMANENT,
    shutdown: float | None = _DEFAULT,
    significant: bool = False,
    name: str | None = None,
    **kwargs: Any,
) -> ChildSpec:
    """A child spec: ``target(*args, **kwargs)`` supervised under ``id``.

    ``shutdown`` is how long a stop waits (workers 5 s, supervisors infinity by default);
    ``name`` registers a Server or supervisor for `whereis`. To pass the target an argument
    named like one of these keywords, wrap it in `functools.partial`.
    """
    extra: dict[str, Any] = {} if shutdown is _DEFAULT else {"shutdown": shutdown}
    return ChildSpec(
        id=id,
        target=target,
        args=args,
        kwargs=kwargs,
        restart=restart,
        significant=significant,
        name=name,
        **extra,
    )


@attrs.frozen(slots=True)
class ChildInfo:
    """One child as `which_children` sees it. ``ref`` is the running child's handle: a
    `ServerRef`, a supervisor ref, a `ProcessHandle`, or whatever a function passed to
    ``task_status.started``."""

    id: str
    state: ChildState
    restarts: int
    kind: str = "worker"
    ref: Any = attrs.field(default=None, eq=False)


@attrs.frozen(slots=True)
class ChildCounts:
    """OTP's ``count_children``: specs, running children, and specs by kind."""

    specs: int
    active: int
    supervisors: int
    workers: int
