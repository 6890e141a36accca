"""Task functions the farm node tests run by name (``farmfuncs:NAME``)."""

from __future__ import annotations

import time
from collections import Counter

import trio

from supervise.tasks import TaskContext, idempotency_key

CALLS: Counter[str] = Counter()


async def tick(i: int) -> int:
    await trio.sleep(1)
    CALLS[f"s{i}"] += 1
    return i * i


async def ticks(ctx: TaskContext, n: int) -> int:
    """``n`` async steps of 1 s (virtual time in tests); the sum of their squares."""
    total = 0
    for i in range(n):
        total += await ctx.step(f"s{i}", tick, i)
        ctx.progress((i + 1) / n)
    return total


def effect(path: str, key: str, i: int, secs: float) -> int:
    """A step with a side effect: after ``secs`` it appends its idempotency key to ``path``."""
    time.sleep(secs)
    with open(path, "a") as f:
        f.write(key + "\n")
    return i * i


async def effects(ctx: TaskContext, path: str, n: int, secs: float) -> int:
    """``n`` steps of ``secs`` seconds, each recording its key once done."""
    total = 0
    for i in range(n):
        key = idempotency_key(ctx.task_id, f"s{i}")
        total += await ctx.step(f"s{i}", effect, path, key, i, secs)
        ctx.progress((i + 1) / n)
    return total


def die() -> None:
    import os

    os._exit(9)  # a crash no exception handler sees (a segfault, an OOM kill)


async def crash(ctx: TaskContext) -> None:
    """Its worker process dies in the first step."""
    await ctx.step("die", die)


async def big(ctx: TaskContext, n: int) -> bytes:
    """Returns ``n`` bytes (a result larger than a message header)."""
    return b"x" * n


async def fails(ctx: TaskContext, n: int) -> None:
    """Raises an error whose message is ``n`` characters long."""
    raise ValueError("E" * n)
