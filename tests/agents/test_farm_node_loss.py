"""A farm node lost or frozen under real ``supervise node --tasks`` agents (one 3-node farm,
lean; node 0, the coordinator, offers too little CPU to run the tasks, so they run on 1 and 2):

- SIGSTOP of the node running a task (agent and worker) past its lease: the task resumes on
  the other node; after SIGCONT the zombie's late commit is refused by its own agent, the
  zombie is killed, and the task completes exactly once with the right result;
- kill -9 of the node running a task (agent and worker) mid-step: the task completes on the
  other node from the journal replicated there, no finished step ran again (each step appends
  its idempotency key to a file: counted), the result is right."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from supervise._testing.cluster import LocalCluster
from supervise._testing.poll import wait_until_async
from supervise._testing.procs import send_signal
from supervise.tasks import Farm, TaskInfo, TaskState
from tests.agents.nodekit import FAST_POLICY

ROOT = Path(__file__).resolve().parents[2]
TARGET = "tests.agents.farmfuncs:effects"
N_STEPS = 4
STEP_S = 1.0  # far longer than a commit: a kill lands mid-step, never mid-commit
RESULT = sum(i * i for i in range(N_STEPS))


def _task_worker(c: LocalCluster, rank: int, task_id: str) -> int:
    """The pid of the newest worker ``rank``'s agent started for ``task_id`` (booked)."""
    started = [x for x in c.events(rank, "task worker started") if x.get("task") == task_id]
    pid = int(started[-1]["pid"])
    c.book.add(pid, f"task worker ({task_id})")
    return pid


def _book_workers(c: LocalCluster) -> None:
    for agent in c.started:
        for line in agent.events("task worker started"):
            c.book.add(int(line["pid"]), f"task worker ({line['task']})")


def _keys(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def test_a_lost_or_frozen_farm_node_its_task_completes_elsewhere_once(tmp_path: Path) -> None:
    c = LocalCluster(tmp_path, 3, command=(), policy=FAST_POLICY, env={"PYTHONPATH": str(ROOT)})
    with c:
        try:
            c.options = ["--tasks", "--cpus", "0.5"]
            c.start(0)
            c.options = ["--tasks", "--cpus", "4"]
            c.start(1)
            c.start(2)
            trio.run(_scenario, c, tmp_path)
        finally:
            _book_workers(c)


async def _running(farm: Farm, task_id: str, *, progress: float, not_on: int = -1) -> TaskInfo:
    """``task_id`` running (not on ``not_on``) with at least ``progress`` committed there."""

    async def reached() -> TaskInfo | None:
        info = await farm.show(task_id)
        ok = info.state is TaskState.RUNNING and info.node not in (None, not_on)
        return info if ok and info.progress >= progress else None

    info: TaskInfo = await wait_until_async(
        reached, what=f"{task_id} running, progress {progress}", timeout_s=60.0
    )
    return info


async def _scenario(c: LocalCluster, tmp: Path) -> None:
    async with Farm(c.nodes, timeout=60.0) as farm:  # agents start slowly on a busy host
        # -- SIGSTOP of the running node past its lease -----------------------------------
        frozen_keys = tmp / "frozen.keys"
        await farm.submit(TARGET, str(frozen_keys), N_STEPS, STEP_S, task_id="frozen")
        info = await _running(farm, "frozen", progress=0.25)  # s0 and s1 committed
        node = info.node
        assert node in (1, 2)
        agent, worker = c.agents[node].pid, _task_worker(c, node, "frozen")
        send_signal(agent, signal.SIGSTOP)
        send_signal(worker, signal.SIGSTOP)
        done_before = sum(_keys(frozen_keys).values())
        try:
            moved = await _running(farm, "frozen", progress=0.0, not_on=node)
        finally:
            # the worker wakes first: it ends its step (its effect is written) and asks its
            # still frozen agent to commit it; the agent wakes to that request, lease lapsed
            send_signal(worker, signal.SIGCONT)
            with trio.move_on_after(10.0):
                while sum(_keys(frozen_keys).values()) == done_before:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await trio.sleep(0.3)  # the commit request on its way
            send_signal(agent, signal.SIGCONT)
        assert moved.attempt > info.attempt
        assert await farm.result("frozen", timeout=90) == RESULT
        history = (await farm.show("frozen")).history
        assert [h.target for h in history].count(TaskState.COMPLETED) == 1

        async def zombie_gone() -> Any:
            ended = ("zombie attempt: killing its worker", "attempt ended after refused commits")
            return any(c.events(node, e) for e in ended) or None

        # it ended either way: killed as stale at its next renewal, or when the refusal
        # failed its step first
        await wait_until_async(zombie_gone, what="the zombie attempt gone", timeout_s=30.0)
        refused = c.events(node, "refused a task commit")
        assert refused, "the zombie's late commit reached its agent and was not refused"
        keys = _keys(frozen_keys)
        assert sorted(keys) == [f"frozen/s{i}" for i in range(N_STEPS)]
        assert sum(keys.values()) <= N_STEPS + 1  # only the zombie's step in flight, twice

        # -- kill -9 of the running node mid-step ------------------------------------------
        killed_keys = tmp / "killed.keys"
        await farm.submit(TARGET, str(killed_keys), N_STEPS, STEP_S, task_id="killed")
        info = await _running(farm, "killed", progress=0.25)
        node = info.node
        assert node in (1, 2)
        worker = _task_worker(c, node, "killed")
        c.kill_node(node)  # the agent, its RAM...
        send_signal(worker, signal.SIGKILL)  # ...and the task's worker
        assert await farm.result("killed", timeout=90) == RESULT
        done = await farm.show("killed")
        assert done.node != node
        assert any(h.reason == "node_lost" for h in done.history)
        keys = _keys(killed_keys)
        assert sorted(keys) == [f"killed/s{i}" for i in range(N_STEPS)]
        assert set(keys.values()) == {1}, keys  # no finished step ran again
