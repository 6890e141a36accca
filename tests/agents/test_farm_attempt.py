"""`WorkerRunner` and a warm worker's handed-back outcome: committed by the agent into the
task's journal under the attempt's fence, past the same gate as a worker's own commits (a
lapsed lease or a stale fence refuses it, and nothing reaches the journal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from supervise.agents.farm_attempt import Running, WorkerRunner
from supervise.tasks import TaskSpec, encode
from supervise.tasks._pool_wire import Order
from supervise.tasks.host import open_journal_host
from supervise.tasks.journal import Outcome
from supervise.tasks.pool import Ended

SHARD = 7


class _Worker:
    pid = 4242

    def stop(self, *, hard: bool) -> None:
        raise AssertionError("not stopped in these tests")


class _Pool:
    """A pool whose worker hands back ``outcome`` for every order (the orders are kept)."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.orders: list[Order] = []

    async def run_attempt(self, order: Order, on_started: Any) -> Ended:
        self.orders.append(order)
        on_started(_Worker())
        return Ended("", self.outcome)


def _run(attempt: int, fence: int) -> Running:
    spec = TaskSpec("taskfuncs:plain", (1,), task_id="t")
    return Running("t", attempt, fence, spec, 5.0, SHARD, trio.current_time())


async def test_a_handed_back_outcome_is_committed_under_the_fence_or_refused_at_the_gate(
    tmp_path: Path,
) -> None:
    async with open_journal_host(tmp_path) as host:
        why: list[str | None] = ["lease lapsed"]

        async def gate(run: Running) -> str | None:
            return why[0]

        pool = _Pool(Outcome(1, value=encode(3)))
        runner = WorkerRunner(host, tmp_path, node="0", pool=pool, may_finish=gate)  # type: ignore[arg-type]
        end = await runner(_run(1, fence=5))
        assert end.outcome is None and "refused: lease lapsed" in end.lost
        assert host.service.versions(SHARD) == []  # nothing reached the journal
        assert pool.orders[0].fresh

        why[0] = None
        end = await runner(_run(1, fence=5))
        assert end.outcome == pool.outcome
        (held,) = host.service.versions(SHARD)
        assert held.generation == 5  # the attempt's fence, as its worker would have written
        assert host.journal(SHARD).outcome() == pool.outcome
        assert pool.orders[1].fresh

        pool.outcome = Outcome(2, value=encode(4))
        end = await runner(_run(2, fence=9))
        assert end.outcome == pool.outcome and not pool.orders[2].fresh  # it held something
        assert host.service.versions(SHARD)[-1].generation == 9
