"""Helpers for runtime tests: children that record what happens to them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

import supervise as sv


class Journal:
    """An ordered record of (event, child id) pairs plus helpers to build recording children."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.starts: dict[str, list[float]] = {}

    def of(self, kind: str) -> list[str]:
        return [who for what, who in self.events if what == kind]

    def count(self, kind: str, who: str) -> int:
        return self.of(kind).count(who)

    def worker(
        self,
        name: str,
        *,
        crash_after: float | None = None,
        exit_after: float | None = None,
        exc: type[BaseException] = RuntimeError,
    ) -> Callable[[], Any]:
        """An async function child: records start/stop, crashes or returns after a delay."""

        async def run() -> None:
            self.events.append(("start", name))
            self.starts.setdefault(name, []).append(trio.current_time())
            try:
                if crash_after is not None:
                    await trio.sleep(crash_after)
                    raise exc(f"{name} crashed")
                if exit_after is not None:
                    await trio.sleep(exit_after)
                    return
                await trio.sleep_forever()
            finally:
                self.events.append(("stop", name))

        run.__name__ = f"worker_{name}"
        return run

    def flaky(self, name: str, failures: list[bool]) -> Callable[[], Any]:
        """Crashes on start while ``failures`` pops True, else runs forever."""

        async def run() -> None:
            self.events.append(("start", name))
            self.starts.setdefault(name, []).append(trio.current_time())
            if failures and failures.pop(0):
                raise RuntimeError(f"{name} failed")
            await trio.sleep_forever()

        return run


async def wait_for(predicate: Callable[[], bool], step: float = 0.01, limit: int = 10_000) -> None:
    """Poll ``predicate`` (virtual time under autojump_clock)."""
    for _ in range(limit):
        if predicate():
            return
        await trio.sleep(step)
    raise AssertionError("condition never became true")


async def states(ref: sv.SupervisorRef | sv.DynamicSupervisorRef) -> dict[str, str]:
    return {c.id: c.state.value for c in await ref.which_children()}
