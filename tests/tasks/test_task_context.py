"""TaskContext: a step's result is committed before it counts as done and a resumed attempt
gets it back without running it; the checkpoint strategies decide when commits happen (checked
in virtual time); state, progress and idempotency keys survive attempts."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
import trio

from supervise.tasks import (
    AtMilestones,
    Automatic,
    EverySeconds,
    Manual,
    MemoryJournal,
    StepError,
    TaskContext,
    UnsupportedValue,
)
from supervise.tasks.policy import Checkpoint


def _ctx(journal: MemoryJournal, attempt: int = 1, checkpoint: Checkpoint | None = None) -> Any:
    return TaskContext(
        task_id="t",
        attempt=attempt,
        node="n0",
        journal=journal,
        checkpoint=checkpoint,
        clock=trio.current_time,
    )


async def test_committed_steps_are_replayed_not_run_again() -> None:
    calls: Counter[str] = Counter()
    keys: list[str | None] = []
    journal = MemoryJournal()

    def load(n: int) -> list[int]:
        calls["load"] += 1
        keys.append(first.current_key)
        return list(range(n))

    async def total(rows: list[int]) -> int:
        calls["total"] += 1
        return sum(rows)

    first = _ctx(journal)
    rows = await first.step("load", load, 4)
    first.state["seen"] = len(rows)
    first.progress(0.5)
    await first.checkpoint()
    assert journal.read().steps["load"].key == "t/load" == keys[0]
    # attempt 1 dies here; attempt 2 starts from the journal
    second = _ctx(journal, attempt=2)
    assert (second.state, second.fraction) == ({"seen": 4}, 0.5)
    assert (second.attempt, second.node) == (2, "n0")
    assert await second.step("load", load, 4) == [0, 1, 2, 3]
    assert await second.step("total", total, rows) == 6
    assert calls == {"load": 1, "total": 1}
    assert (second.replayed, second.ran) == (["load"], ["total"])
    assert second.key("load") == first.key("load")


async def test_sync_steps_run_in_a_thread_async_steps_in_the_task() -> None:
    ctx = _ctx(MemoryJournal())
    main = threading.get_ident()
    assert await ctx.step("sync", threading.get_ident) != main

    async def here() -> int:
        return threading.get_ident()

    assert await ctx.step("async", here) == main


@pytest.mark.parametrize(
    ("checkpoint", "commits_after"),
    [
        (None, [1, 2, 3, 4, 5, 6]),  # every step
        (EverySeconds(2.5), [0, 0, 1, 1, 1, 2]),  # steps end at t = 1, 2, 3, ...
        (Automatic(first=1, max=4, growth=2), [1, 1, 2, 2, 2, 2]),  # at t = 1, 3, (7)
        (Manual(), [0, 0, 0, 0, 0, 0]),
        (AtMilestones((0.3, 0.6)), [0, 0, 1, 1, 2, 2]),  # progress i/6 after step i
    ],
)
async def test_checkpoint_strategies_commit_when_due(
    autojump_clock: trio.testing.MockClock, checkpoint: Checkpoint | None, commits_after: list[int]
) -> None:
    journal = MemoryJournal()
    ctx = _ctx(journal, checkpoint=checkpoint)

    async def work() -> None:
        await trio.sleep(1)

    seen = []
    for i in range(6):
        await ctx.step(f"s{i}", work)
        ctx.progress((i + 1) / 6)
        seen.append(journal.read().commits)
    assert seen == commits_after


async def test_uncommitted_steps_run_again_and_manual_checkpoint_commits() -> None:
    journal = MemoryJournal()
    ctx = _ctx(journal, checkpoint=Manual())
    await ctx.step("a", int, 1)
    assert _ctx(journal, 2).replayed == [] and not journal.read().steps
    await ctx.checkpoint()
    assert list(journal.read().steps) == ["a"]


async def test_misuse_is_a_one_line_error() -> None:
    ctx = _ctx(MemoryJournal())
    await ctx.step("a", int, 1)
    with pytest.raises(StepError, match=r"^step 'a' ran already in this attempt"):
        await ctx.step("a", int, 1)
    with pytest.raises(StepError, match=r"^step name '': must be a non-empty string$"):
        await ctx.step("", int, 1)
    with pytest.raises(UnsupportedValue, match=r"^steps\.feats\[1\]: set is not supported$"):
        await ctx.step("feats", lambda: [1, {2}])
    ctx.state["bad"] = object()
    with pytest.raises(UnsupportedValue, match=r"^state\.bad: object is not supported$"):
        await ctx.checkpoint()
    with pytest.raises(ValueError, match=r"^progress = 1.5: must be a number in \[0, 1\]$"):
        ctx.progress(1.5)


class _SlowJournal(MemoryJournal):
    """A journal whose first commit waits (in its thread) until told to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = trio.Event()
        self.go = threading.Event()
        self._token = trio.lowlevel.current_trio_token()

    def commit(self, commit: Any) -> None:
        if not self.go.is_set():
            trio.from_thread.run_sync(self.writing.set, trio_token=self._token)
            self.go.wait(30)
        super().commit(commit)


async def _value(v: int) -> int:
    return v


async def test_a_step_that_ends_during_a_checkpoint_stays_pending_until_committed() -> None:
    journal = _SlowJournal()
    ctx = _ctx(journal, checkpoint=Manual())

    async def other_branch() -> None:
        await journal.writing.wait()  # the checkpoint below is writing [x]...
        await ctx.step("b", _value, 2)  # ...when b ends: not in that commit
        journal.go.set()

    async with trio.open_nursery() as nursery:
        await ctx.step("x", _value, 1)
        nursery.start_soon(other_branch)
        await ctx.checkpoint()
    await ctx.checkpoint()  # b is committed now (it was not marked done by the first)
    assert sorted(journal.read().steps) == ["b", "x"]


class _OverlapJournal(MemoryJournal):
    """Notes commits that overlap; the first waits (in its thread) until told to go on."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = trio.Event()
        self.go = threading.Event()
        self.overlap = False
        self._active = 0
        self._lock = threading.Lock()
        self._token = trio.lowlevel.current_trio_token()

    def commit(self, commit: Any) -> None:
        with self._lock:
            self._active += 1
            first = not self.writing.is_set()
            self.overlap |= self._active > 1
        if self.overlap:
            self.go.set()
        if first:
            trio.from_thread.run_sync(self.writing.set, trio_token=self._token)
            self.go.wait(30)
        super().commit(commit)
        with self._lock:
            self._active -= 1


async def test_commits_of_steps_ending_together_never_overlap() -> None:
    """Journals number their commits in order (a disk journal's next file, an arena journal's
    next version): two at once would write the same number and one would replace the other."""
    journal = _OverlapJournal()
    ctx = _ctx(journal)

    async def other_branch() -> None:
        await journal.writing.wait()  # x's commit is being written...
        nursery.start_soon(ctx.step, "b", _value, 2)  # ...when b ends and commits
        while not journal.overlap and ctx._writing.statistics().tasks_waiting == 0:  # noqa: ASYNC110
            await trio.sleep(0.001)  # until b's commit overlaps x's, or waits for it
        journal.go.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_branch)
        await ctx.step("x", _value, 1)
    assert not journal.overlap
    assert sorted(journal.read().steps) == ["b", "x"]
