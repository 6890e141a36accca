"""What supervisor refs have in common: queries, terminate_child, start_child, stop.

The management API with OTP's semantics and error cases; each change runs as a command in the
supervisor's control loop (`Core.request`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from supervise._validation import InvalidValue
from supervise.runtime import registry
from supervise.runtime._child import RUNNING, STOPPED
from supervise.runtime._core import Core
from supervise.runtime.errors import AlreadyPresent, AlreadyRunning, StartFailed, TooManyChildren
from supervise.runtime.exit import ExitReason
from supervise.runtime.spec import AutoShutdown, ChildCounts, ChildInfo, ChildSpec

R = TypeVar("R", bound="SupervisorRefBase")


class SupervisorRefBase:
    """A handle on one running supervisor (like an OTP pid): valid until it stops, then every
    call raises `NoProc`."""

    __slots__ = ("_core",)

    def __init__(self, core: Core) -> None:
        self._core = core

    @property
    def path(self) -> str:
        """The supervisor's place in the tree, child ids joined by ``/`` (``root`` at the top)."""
        return self._core.path

    @property
    def alive(self) -> bool:
        """Whether it still runs (not shutting down or stopped)."""
        return not self._core.closing

    async def which_children(self) -> list[ChildInfo]:
        """Every child in start order: id, state, restarts, kind and (when running) its ref."""
        await trio.lowlevel.checkpoint()
        self._core.check_alive()
        return [c.info() for c in self._core.children]

    async def count_children(self) -> ChildCounts:
        """Counts of specs, running children, supervisors and workers."""
        await trio.lowlevel.checkpoint()
        self._core.check_alive()
        children = self._core.children
        sups = sum(1 for c in children if c.spec.kind == "supervisor")
        active = sum(1 for c in children if c.state is RUNNING)
        return ChildCounts(len(children), active, sups, len(children) - sups)

    async def start_child(self, spec: ChildSpec) -> ChildInfo:
        """Add ``spec`` as the last child and start it; `StartFailed` if it cannot start."""
        return await self._core.request(lambda: self._start_child(spec))

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child (within its ``shutdown``); a no-op if it is already stopped."""
        await self._core.request(lambda: self._terminate_child(child_id))

    async def stop(self) -> None:
        """Stop all children in reverse order, then the supervisor; returns once done."""
        await self._core.stop()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"<{type(self).__name__} {self.path} {state}>"

    # -- commands, run in the control loop --

    async def _start_child(self, spec: ChildSpec) -> ChildInfo:
        core = self._core
        if not isinstance(spec, ChildSpec):
            raise InvalidValue("spec", spec, "must be a ChildSpec (see supervise.child)")
        existing = core.by_id.get(spec.id)
        if existing is not None:
            if existing.active or existing.state is not STOPPED:
                raise AlreadyRunning(spec.id, existing.state.value)
            raise AlreadyPresent(spec.id)
        if spec.significant and core.auto_shutdown is AutoShutdown.NEVER:
            raise InvalidValue(
                "significant", True, "needs a supervisor with auto_shutdown other than 'never'"
            )
        if core.max_children is not None and len(core.children) >= core.max_children:
            raise TooManyChildren(core.max_children)
        child = core.add(spec)
        failure = await core.activate(child)
        if failure is not None:
            core.remove(child)  # OTP: a spec that failed to start is not kept
            raise StartFailed(spec.id, failure)
        return child.info()

    async def _terminate_child(self, child_id: str) -> None:
        child = self._core.find(child_id)
        child.is_restart = False
        await self._core.stop_child(child)


async def run_registered(
    core: Core, ref: R, name: str | None, started: Callable[[R], None]
) -> ExitReason:
    """Run a supervisor's ``core``, its ``ref`` registered under ``name`` while it runs."""
    if name is not None:
        registry.register(name, ref)
    try:
        return await core.run(lambda: started(ref))
    finally:
        if name is not None:
            registry.unregister(name, ref)
