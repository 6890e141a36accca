"""Supervisor: a static list of children, started in order, restarted per strategy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import trio

from supervise._validation import InvalidValue, enum_value, instance_of, number
from supervise.runtime._child import STOPPED
from supervise.runtime._core import Core
from supervise.runtime._refs import SupervisorRefBase, run_registered
from supervise.runtime.backoff import Backoff
from supervise.runtime.errors import AlreadyRunning, StartFailed, StillRunning
from supervise.runtime.exit import ExitReason
from supervise.runtime.spec import AutoShutdown, ChildInfo, ChildSpec, LaunchContext, Strategy


class SupervisorRef(SupervisorRefBase):
    """A running `Supervisor`: OTP's management API (``which_children``, ``restart_child``...)."""

    __slots__ = ()

    async def restart_child(self, child_id: str) -> ChildInfo:
        """Start a stopped child again (its spec was kept); `AlreadyRunning` if it runs."""
        return await self._core.request(lambda: self._restart_child(child_id))

    async def delete_child(self, child_id: str) -> None:
        """Forget a stopped child's spec; `StillRunning` if it runs."""
        await self._core.request(lambda: self._delete_child(child_id))

    async def child_spec(self, child_id: str) -> ChildSpec:
        """The spec of a child (OTP's ``get_childspec``)."""
        await trio.lowlevel.checkpoint()
        self._core.check_alive()
        return self._core.find(child_id).spec

    async def _restart_child(self, child_id: str) -> ChildInfo:
        child = self._core.find(child_id)
        if child.active or child.state is not STOPPED:
            raise AlreadyRunning(child_id, child.state.value)
        child.restarts += 1
        child.is_restart = True
        failure = await self._core.activate(child)
        if failure is not None:
            child.is_restart = False
            child.restarts -= 1
            child.state = STOPPED
            raise StartFailed(child_id, failure)
        return child.info()

    async def _delete_child(self, child_id: str) -> None:
        child = self._core.find(child_id)
        if child.active or child.state is not STOPPED:
            raise StillRunning(child_id, child.state.value)
        self._core.remove(child)


def _strategy(value: Strategy | str) -> Strategy:
    return enum_value(Strategy, "strategy", value)


def _auto_shutdown(value: AutoShutdown | str) -> AutoShutdown:
    return enum_value(AutoShutdown, "auto_shutdown", value)


def _children(value: Sequence[ChildSpec]) -> tuple[ChildSpec, ...]:
    if isinstance(value, ChildSpec | str | bytes) or not isinstance(value, Sequence):
        raise InvalidValue("children", value, "must be a list of child specs (supervise.child)")
    return tuple(value)


@attrs.frozen(slots=True, eq=False)
class Supervisor:
    """An immutable supervisor spec. ``await nursery.start(sup.run)`` runs it and returns a
    `SupervisorRef`; use it as a child target to nest it."""

    _supervise_kind: ClassVar[str] = "supervisor"
    _supervise_takes_args: ClassVar[bool] = False
    _supervise_registers: ClassVar[bool] = True

    children: tuple[ChildSpec, ...] = attrs.field(converter=_children)
    strategy: Strategy = attrs.field(
        default=Strategy.ONE_FOR_ONE, converter=_strategy, kw_only=True
    )
    max_restarts: int = attrs.field(default=3, validator=number(ge=0, integer=True), kw_only=True)
    max_seconds: float = attrs.field(default=5.0, validator=number(gt=0), kw_only=True)
    backoff: Backoff | None = attrs.field(
        default=None, validator=instance_of(Backoff, optional=True), kw_only=True
    )
    auto_shutdown: AutoShutdown = attrs.field(
        default=AutoShutdown.NEVER, converter=_auto_shutdown, kw_only=True
    )

    def __attrs_post_init__(self) -> None:
        seen: set[str] = set()
        for spec in self.children:
            if not isinstance(spec, ChildSpec):
                raise InvalidValue("children", spec, "must be a child spec (supervise.child)")
            if spec.id in seen:
                raise InvalidValue("children", spec.id, "duplicate child id")
            seen.add(spec.id)
            if spec.significant and self.auto_shutdown is AutoShutdown.NEVER:
                raise InvalidValue(
                    "significant",
                    spec.id,
                    "significant children need auto_shutdown other than 'never'",
                )

    async def run(
        self,
        *,
        name: str | None = None,
        task_status: trio.TaskStatus[SupervisorRef] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the children in order and supervise them until stopped.

        Returns after ``ref.stop()`` or an auto_shutdown; raises `GaveUp` when the restart
        intensity is exceeded and `StartFailed` when a child cannot start; an outside
        cancellation stops the children in reverse order first. ``name`` registers the ref.
        """
        await self._run(name, task_status.started)

    async def _supervise_launch(self, ctx: LaunchContext) -> ExitReason:
        return await self._run(ctx.spec.name, ctx.started)

    async def _run(self, name: str | None, started: Callable[[SupervisorRef], None]) -> ExitReason:
        core = Core(
            children=self.children,
            strategy=self.strategy,
            max_restarts=self.max_restarts,
            max_seconds=self.max_seconds,
            backoff=self.backoff,
            auto_shutdown=self.auto_shutdown,
            dynamic=False,
            max_children=None,
        )
        return await run_registered(core, SupervisorRef(core), name, started)
