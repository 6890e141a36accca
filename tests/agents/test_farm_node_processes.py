"""Farm nodes as real processes (transport, arenas, task workers), the test playing the
coordinator so it picks where each task runs and what each assignment says (the same
scenarios through the real coordinator: test_farm_node_loss.py): a kill -9 of a node (agent
and worker) mid-step -> the task completes on a node that held no replica, from the journal it
fetched from a third, no finished step re-run, the result right; a task whose worker crashes
is an attempt's error while its node runs on; a pause stops the worker once every step it
finished is committed (the steps reported are exactly the effects done), and the task resumes
from there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from farmnodekit import FakeCoordinator

from supervise._testing.poll import wait_until_async
from supervise._testing.procs import PidBook, free_ports, send_signal
from supervise.cluster import Transport
from supervise.tasks import TaskSpec, decode
from supervise.tasks.farm_messages import KINDS, Assign, AttemptPhase, Stop, StopWhy, Update
from supervise.tasks.journal_replica import KINDS as JOURNAL_KINDS

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
COORD = 3
LEASE = 3.0
N_STEPS = 4
STEP_S = 1.0  # a step far longer than a push: the kill lands mid-step, never mid-commit


class Farm:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.endpoints = [f"tcp://127.0.0.1:{p}" for p in free_ports(4)]
        self.book = PidBook()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.pids = tmp / "task-pids"
        self.pids.touch()

    def start(self, rank: int, peers: list[int]) -> None:
        shm = self.tmp / f"shm{rank}"
        shm.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
            "FARM_SHM": str(shm),
            "FARM_PIDS": str(self.pids),
        }
        argv = [sys.executable, str(HERE / "farm_node_proc.py"), str(rank), str(COORD)]
        argv += [",".join(map(str, peers)) or "-", *self.endpoints]
        with (self.tmp / f"node{rank}.log").open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs[rank] = proc
        self.book.add(proc.pid, f"farm node {rank}")

    def worker(self, task_id: str) -> int:
        """The newest task worker's pid for ``task_id``."""
        lines = [x.split() for x in self.pids.read_text().splitlines()]
        pids = [int(pid) for t, pid in lines if t == task_id]
        for pid in pids:
            self.book.add(pid, f"task worker ({task_id})")
        return pids[-1]

    def log(self, rank: int) -> str:
        return (self.tmp / f"node{rank}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- node {r} ---\n{self.log(r)[-3000:]}" for r in self.procs)


def _assign(spec: TaskSpec, fence: int, fetch_from: list[int]) -> Assign:
    return Assign(spec.task_id, fence, fence, spec.to_bytes(), {"cpu": 1}, LEASE, fetch_from)


def _keys(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


async def test_killed_mid_step_fetched_elsewhere_a_crashing_worker_and_a_pause(
    tmp_path: Path,
) -> None:
    farm = Farm(tmp_path)
    transport = Transport(
        rank=COORD,
        endpoint=farm.endpoints[COORD],
        peers=dict(enumerate(farm.endpoints[:COORD])),
        kinds=KINDS + JOURNAL_KINDS,
        nodes=4,
    )
    coord = FakeCoordinator(transport)
    try:
        async with transport.running():
            # node 0 replicates to node 2 only: node 1 must fetch what node 0 committed
            for rank, peers in ((0, [2]), (1, [0, 2]), (2, [0, 1])):
                farm.start(rank, peers)

            async def wait(cond: object, what: str) -> None:
                await wait_until_async(
                    cond,  # type: ignore[arg-type]
                    what=what,
                    timeout_s=30.0,
                    details=farm.logs,
                )

            await wait(lambda: len(coord.offers) == 3, "every node offered")

            def progressed(task: str, node: int, steps: int, held: int = 3) -> bool:
                return any(
                    u.task_id == task
                    and u.node == node
                    and u.phase is AttemptPhase.PROGRESS
                    and u.steps >= steps
                    and len(u.replicas) >= held
                    for u in coord.updates
                )

            def completed(task: str) -> list[Update]:
                return coord.completed(task)

            # -- kill -9 of node 0 (agent and worker) while its task is mid-step ------------
            effects = tmp_path / "killed.keys"
            spec = TaskSpec("farmfuncs:effects", (str(effects), N_STEPS, STEP_S), task_id="killed")
            coord.fences["killed"] = 1
            reply = await transport.request(0, _assign(spec, 1, []))
            assert reply.body.ok
            await wait(
                lambda: progressed("killed", 0, 2, held=2), "two steps committed and replicated"
            )
            worker = farm.worker("killed")
            send_signal(farm.procs[0].pid, signal.SIGKILL)
            send_signal(worker, signal.SIGKILL)
            done_before = sum(_keys(effects).values())
            # node 1 takes it over, told to fetch the journal from node 2
            coord.fences["killed"] = 2
            assert (await transport.request(1, _assign(spec, 2, [2]))).body.ok
            await wait(lambda: completed("killed"), "the task completed on node 1")
            (done,) = completed("killed")
            assert done.node == 1 and done.fence == 2
            assert decode(done.result or b"") == sum(i * i for i in range(N_STEPS))
            keys = _keys(effects)
            assert sorted(keys) == [f"killed/s{i}" for i in range(N_STEPS)]
            assert set(keys.values()) == {1}, keys  # no finished step ran again
            assert done_before >= 2
            assert "source=fetched" in farm.log(1)

            # -- a task whose worker crashes: an error of the attempt, never the agent's ------
            crash = TaskSpec("farmfuncs:crash", task_id="crash")
            coord.fences["crash"] = 1
            assert (await transport.request(2, _assign(crash, 1, []))).body.ok
            await wait(
                lambda: (2, AttemptPhase.ERRORED) in coord.phases("crash"), "the crash reported"
            )
            (err,) = [u for u in coord.updates if u.phase is AttemptPhase.ERRORED]
            assert "WorkerLost" in err.error_mro and "exit" in (err.error or ""), err
            assert farm.procs[2].poll() is None  # node 2's agent runs on (it takes the next)

            # -- pause: the worker stops after committing every step it finished -----------
            paused_keys = tmp_path / "paused.keys"
            paused = TaskSpec("farmfuncs:effects", (str(paused_keys), 8, 0.5), task_id="paused")
            coord.fences["paused"] = 1
            assert (await transport.request(2, _assign(paused, 1, []))).body.ok
            await wait(lambda: progressed("paused", 2, 1, held=2), "a step of the paused task")
            assert (await transport.request(2, Stop("paused", 1, StopWhy.PAUSE))).body.ok
            await wait(lambda: (2, AttemptPhase.PAUSED) in coord.phases("paused"), "paused")
            (stopped,) = [u for u in coord.updates if u.phase is AttemptPhase.PAUSED]
            assert 1 <= stopped.steps == sum(_keys(paused_keys).values()) < 8
            # resumed (on the same node, from its own arenas): the rest of the steps, once each
            coord.fences["paused"] = 2
            assert (await transport.request(2, _assign(paused, 2, [2]))).body.ok

            await wait(lambda: completed("paused"), "the paused task completed")
            (resumed,) = completed("paused")
            assert resumed.node == 2 and set(_keys(paused_keys).values()) == {1}
            assert len(_keys(paused_keys)) == 8
    finally:
        for proc in farm.procs.values():
            send_signal(proc.pid, signal.SIGTERM)
        for proc in farm.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                send_signal(proc.pid, signal.SIGKILL)
        farm.book.kill_survivors()
