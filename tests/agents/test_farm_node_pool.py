"""Warm task workers on a real farm node (`farm_node_proc.py`, the test playing the
coordinator): many tiny tasks run on a few reused worker processes, each exactly once; a
worker killed -9 mid-step ends that attempt as a loss while the agent runs on, the pool
replaces the worker, and the retried attempt finishes the task from its journal (no finished
step re-run, nothing lost or duplicated). ``--task-workers 0``: a fresh process per attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from farmnodekit import FakeCoordinator

from supervise._testing.poll import wait_until_async
from supervise._testing.procs import PidBook, descendants, free_ports, send_signal
from supervise.cluster import Transport
from supervise.tasks import TaskSpec, decode
from supervise.tasks.farm_messages import KINDS, Assign, AttemptPhase
from supervise.tasks.journal_replica import KINDS as JOURNAL_KINDS

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COORD = 2
LEASE = 5.0
TINY = 40


def _keys(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def _pids(path: Path) -> list[tuple[str, int]]:
    return [(t, int(p)) for t, p in (line.split() for line in path.read_text().splitlines())]


def _assign(spec: TaskSpec, fence: int) -> Assign:
    return Assign(spec.task_id, fence, fence, spec.to_bytes(), {"cpu": 0.1}, LEASE, [])


async def test_tiny_tasks_reuse_warm_workers_and_a_killed_worker_is_replaced(
    tmp_path: Path,
) -> None:
    endpoints = [f"tcp://127.0.0.1:{p}" for p in free_ports(3)]
    pids = tmp_path / "task-pids"
    pids.touch()
    book = PidBook()
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(rank: int, workers: int) -> None:
        shm = tmp_path / f"shm{rank}"
        shm.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
            "FARM_SHM": str(shm),
            "FARM_PIDS": str(pids),
            "FARM_POOL_WORKERS": str(workers),
        }
        argv = [sys.executable, str(HERE / "farm_node_proc.py"), str(rank), str(COORD), "-"]
        with (tmp_path / f"node{rank}.log").open("ab") as out:
            procs[rank] = subprocess.Popen(
                [*argv, *endpoints], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        book.add(procs[rank].pid, f"farm node {rank}")

    def logs() -> str:
        return "\n".join(
            f"--- node {r} ---\n{(tmp_path / f'node{r}.log').read_text(errors='replace')[-3000:]}"
            for r in procs
        )

    transport = Transport(
        rank=COORD,
        endpoint=endpoints[COORD],
        peers=dict(enumerate(endpoints[:COORD])),
        kinds=KINDS + JOURNAL_KINDS,
        nodes=3,
    )
    coord = FakeCoordinator(transport)

    async def wait(cond: Any, what: str) -> None:
        await wait_until_async(cond, what=what, timeout_s=60.0, details=logs)

    async def run(rank: int, spec: TaskSpec, fence: int = 1) -> None:
        coord.fences[spec.task_id] = fence
        assert (await transport.request(rank, _assign(spec, fence))).body.ok

    def completed(task: str) -> bool:
        return bool(coord.completed(task))

    try:
        async with transport.running():
            start(0, workers=2)
            start(1, workers=0)
            await wait(lambda: len(coord.offers) == 2, "both nodes offered")

            # -- many tiny tasks, all at once, on node 0's two warm workers -----------------
            tiny = tmp_path / "tiny.keys"
            specs = [TaskSpec("farmfuncs:effects", (str(tiny), 1, 0.0)) for _ in range(TINY)]
            for spec in specs:
                await run(0, spec)
            await wait(lambda: all(completed(s.task_id) for s in specs), "every tiny task")
            assert sorted(_keys(tiny)) == sorted(f"{s.task_id}/s0" for s in specs)
            assert set(_keys(tiny).values()) == {1}  # each ran exactly once
            tiny_ids = {s.task_id for s in specs}
            used = {pid for task, pid in _pids(pids) if task in tiny_ids}
            for pid in used:
                book.add(pid, "task worker")
            # reused: a handful of processes ran them all (the pool grows only for long ones)
            assert len(used) <= TINY // 4, used
            assert used & set(descendants(procs[0].pid))  # the agent's own children

            # -- a worker killed -9 mid-step: a loss; the pool replaces it ------------------
            effects = tmp_path / "victim.keys"
            victim = TaskSpec("farmfuncs:effects", (str(effects), 4, 1.0), task_id="victim")
            await run(0, victim)

            def progressed(steps: int) -> bool:
                return any(
                    u.task_id == "victim" and u.phase is AttemptPhase.PROGRESS and u.steps >= steps
                    for u in coord.updates
                )

            await wait(lambda: progressed(2), "two steps of the victim committed")
            killed = [pid for task, pid in _pids(pids) if task == "victim"][-1]
            assert send_signal(killed, signal.SIGKILL)
            await wait(lambda: (0, AttemptPhase.ERRORED) in coord.phases("victim"), "the loss")
            (lost,) = [u for u in coord.updates if u.phase is AttemptPhase.ERRORED]
            assert "WorkerLost" in lost.error_mro, lost
            assert procs[0].poll() is None  # the agent runs on
            done_before = sum(_keys(effects).values())
            await run(0, victim, fence=2)  # the retry (the coordinator's, per the policy)
            await wait(lambda: completed("victim"), "the retried victim completed")
            (done,) = coord.completed("victim")
            assert done.fence == 2 and decode(done.result or b"") == sum(i * i for i in range(4))
            keys = _keys(effects)
            assert sorted(keys) == [f"victim/s{i}" for i in range(4)]
            assert set(keys.values()) == {1} and done_before >= 2  # no finished step re-ran
            retried = [pid for task, pid in _pids(pids) if task == "victim"][-1]
            assert retried != killed

            # -- --task-workers 0: each attempt in a fresh process ---------------------------
            fresh = [TaskSpec("farmfuncs:effects", (str(tiny), 1, 0.0)) for _ in range(3)]
            for spec in fresh:
                await run(1, spec)
            await wait(lambda: all(completed(s.task_id) for s in fresh), "the fresh ones")
            ids = {s.task_id for s in fresh}
            assert len({pid for task, pid in _pids(pids) if task in ids}) == 3
    finally:
        for proc in procs.values():
            book.add_descendants(proc.pid, "under a farm node")
            send_signal(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                send_signal(proc.pid, signal.SIGKILL)
        book.kill_survivors()
