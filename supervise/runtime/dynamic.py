"""DynamicSupervisor: starts with no children; children are added at run time (one_for_one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import trio

from supervise._validation import instance_of, number
from supervise.runtime._core import Core
from supervise.runtime._refs import SupervisorRefBase, run_registered
from supervise.runtime.backoff import Backoff
from supervise.runtime.exit import ExitReason
from supervise.runtime.spec import AutoShutdown, LaunchContext, Strategy


class DynamicSupervisorRef(SupervisorRefBase):
    """A running `DynamicSupervisor`. Children that stop for good are forgotten, so there is no
    ``restart_child`` / ``delete_child`` (as in Elixir)."""

    __slots__ = ()


def _max_children(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        number(ge=1, integer=True)(_inst, attr, value)


@attrs.frozen(slots=True, eq=False, kw_only=True)
class DynamicSupervisor:
    """An immutable spec for a supervisor of children started on demand with
    ``ref.start_child(spec)``; more than ``max_children`` raises `TooManyChildren`."""

    _supervise_kind: ClassVar[str] = "supervisor"
    _supervise_takes_args: ClassVar[bool] = False
    _supervise_registers: ClassVar[bool] = True

    max_children: int | None = attrs.field(default=None, validator=_max_children)
    max_restarts: int = attrs.field(default=3, validator=number(ge=0, integer=True))
    max_seconds: float = attrs.field(default=5.0, validator=number(gt=0))
    backoff: Backoff | None = attrs.field(
        default=None, validator=instance_of(Backoff, optional=True)
    )

    async def run(
        self,
        *,
        name: str | None = None,
        task_status: trio.TaskStatus[DynamicSupervisorRef] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Supervise children added with ``start_child`` until stopped; raises `GaveUp` when
        the restart intensity is exceeded. ``name`` registers the ref."""
        await self._run(name, task_status.started)

    async def _supervise_launch(self, ctx: LaunchContext) -> ExitReason:
        return await self._run(ctx.spec.name, ctx.started)

    async def _run(
        self, name: str | None, started: Callable[[DynamicSupervisorRef], None]
    ) -> ExitReason:
        core = Core(
            children=(),
            strategy=Strategy.ONE_FOR_ONE,
            max_restarts=self.max_restarts,
            max_seconds=self.max_seconds,
            backoff=self.backoff,
            auto_shutdown=AutoShutdown.NEVER,
            dynamic=True,
            max_children=self.max_children,
        )
        return await run_registered(core, DynamicSupervisorRef(core), name, started)
