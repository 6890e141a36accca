"""Task functions the task tests run by name (``taskfuncs:NAME``), with call counters."""

from __future__ import annotations

from collections import Counter
from typing import Any

from supervise.tasks import TaskContext

CALLS: Counter[str] = Counter()
FAIL_TIMES: dict[str, int] = {}


def double(x: int) -> int:
    CALLS["double"] += 1
    return 2 * x


def explode(kind: str) -> None:
    CALLS["explode"] += 1
    if FAIL_TIMES.get("explode", 0) > 0:
        FAIL_TIMES["explode"] -= 1
        raise {"value": ValueError, "key": KeyError}[kind]("explode failed")


async def two_steps(ctx: TaskContext, x: int, kind: str = "value") -> dict[str, Any]:
    """Step one always works; step two fails FAIL_TIMES['explode'] times."""
    a = await ctx.step("double", double, x)
    await ctx.step("explode", explode, kind)
    return {"a": a, "attempt": ctx.attempt}


async def bad_result(ctx: TaskContext) -> Any:
    return {"features": [1, 2, 3, {4}]}


def note(path: str, what: str) -> str:
    with open(path, "a") as f:
        f.write(what + "\n")
    return what


def slow_note(path: str, what: str) -> str:
    import time

    note(path, what)
    time.sleep(0.3)
    return what


async def slow_steps(ctx: TaskContext, log: str, n: int, fail_in: int = 0) -> list[Any]:
    """``n`` steps of 0.3 s, each noting its start in ``log``; attempt ``fail_in`` raises
    before its last step."""
    out = []
    for i in range(n):
        if i == n - 1 and ctx.attempt == fail_in:
            raise RuntimeError(f"attempt {ctx.attempt} fails before its last step")
        out.append(await ctx.step(f"s{i}", slow_note, log, f"s{i}"))
    return out


async def tick(i: int) -> int:
    import trio

    await trio.sleep(1)
    CALLS["tick"] += 1
    return i


async def ticks(ctx: TaskContext, n: int) -> list[Any]:
    """``n`` async steps of 1 s (virtual time in tests)."""
    return [await ctx.step(f"s{i}", tick, i) for i in range(n)]


async def plain(ctx: TaskContext, x: int) -> int:
    """No step, no state: all an attempt leaves is its outcome."""
    CALLS["plain"] += 1
    return 3 * x
