"""The farm's control plane with real ``supervise node --tasks`` agents (one 3-node farm, lean):
tasks submitted through `supervise.tasks.Farm`, the coordinator killed -9 while they run (the
next lowest rank takes the queue over from its replica: nothing lost, nothing duplicated, every
result right), and pause / resume / cancel of a running task."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from supervise._testing.cluster import LocalCluster
from supervise._testing.poll import wait_until_async
from supervise.tasks import Farm, TaskCancelled, TaskState
from tests.agents.nodekit import FAST_POLICY

ROOT = Path(__file__).resolve().parents[2]
N_TASKS = 12


def _worker_pids(c: LocalCluster) -> None:
    """Book every task worker the agents started, so cleanup reaps orphans of a kill -9."""
    for agent in c.started:
        for line in agent.events("task worker started"):
            c.book.add(int(line["pid"]), f"task worker ({line['task']})")


async def _state(farm: Farm, task_id: str, want: TaskState, within: float = 90.0) -> Any:
    async def reached() -> Any:
        info = await farm.show(task_id)
        return info if info.state is want else None

    return await wait_until_async(reached, what=f"{task_id} {want}", timeout_s=within)


def test_farm_through_a_coordinator_kill_and_pause_resume_cancel(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 3, command=(), policy=FAST_POLICY, env={"PYTHONPATH": str(ROOT)})
    c.options = ["--tasks", "--cpus", "4"]
    with c:
        try:
            c.start_all()
            trio.run(_scenario, c)
        finally:
            _worker_pids(c)


async def _scenario(c: LocalCluster) -> None:
    async with Farm(c.nodes, timeout=120.0) as farm:  # a loaded machine starts agents slowly
        ids = [f"t{i:02d}" for i in range(N_TASKS)]
        for i, tid in enumerate(ids):
            await farm.submit("tests.tasks.taskfuncs:two_steps", i, task_id=tid)

        async def on_node0() -> list[str] | None:  # some of them run on the coordinator's node
            return [t.id for t in await farm.list() if t.node == 0] or None

        on0 = await wait_until_async(on_node0, what="a task on node 0", timeout_s=90.0)
        killed_at = time.time()
        c.kill_node(0)  # kill -9 of the coordinator (and its RAM)

        # rank 1 takes the queue over: every task completes once, with the right result
        for i, tid in enumerate(ids):
            got = await farm.result(tid, timeout=120)
            assert got["a"] == 2 * i, (tid, got)
        listed = await farm.list()
        assert sorted(t.id for t in listed) == ids  # nothing lost or added
        assert all(t.state is TaskState.COMPLETED for t in listed)
        for tid in on0:  # moved off the dead node, unless it had finished just before
            history = (await farm.show(tid)).history
            lost = [h for h in history if h.reason == "node_lost"]
            assert lost or history[-1].wall_time < killed_at, history

        # pause (checkpoint, then stop), resume from the checkpoint, cancel
        long = await farm.submit("tests.tasks.taskfuncs:ticks", 60, task_id="long")
        await _state(farm, "long", TaskState.RUNNING, within=120.0)
        await long.pause()
        paused = await _state(farm, "long", TaskState.PAUSED)
        assert paused.node is None
        await long.resume()
        resumed = await _state(farm, "long", TaskState.RUNNING)
        assert resumed.attempt > paused.attempt
        cancelled = await long.cancel()
        assert cancelled.state is TaskState.CANCELLED
        with pytest.raises(TaskCancelled):
            await long.result(timeout=30)
