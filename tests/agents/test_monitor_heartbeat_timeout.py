"""The monitor's deadlines: once a worker has sent a heartbeat, its silence is a hang after
``heartbeat_timeout``, not after the (much longer) ``startup_timeout``; the progress it
reports (`supervise status`): each rank's last step and how long ago; and a hang's evidence
names the rank that stopped stepping, not the ranks blocked waiting for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from supervise._testing.poll import wait_until
from supervise.agents.monitor import (
    Beat,
    BlamedBy,
    Detection,
    Monitor,
    ProcState,
    blame,
    blamed_by,
    proc_state,
)
from supervise.policy import Policy
from supervise.telemetry import Trigger


async def test_hang_after_the_first_heartbeat_is_detected_at_heartbeat_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = Policy.from_dict({"recovery": {"heartbeat_timeout": 3.0, "startup_timeout": 60.0}})
    seen: list[tuple[float, Detection]] = []
    detected = trio.Event()

    def report(d: Detection) -> None:
        seen.append((trio.current_time(), d))
        detected.set()

    monitor = Monitor(policy, report)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        start = trio.current_time()
        monitor.arm(0, pid=1234)
        await trio.sleep(1.0)
        monitor.heartbeat(0, 5, {"loss": 0.5})  # then silence: a hang at step 5
        with trio.move_on_after(100.0):
            await detected.wait()
        nursery.cancel_scope.cancel()
    assert seen, "the hang was never detected"
    at, detection = seen[0]
    assert detection.trigger is Trigger.HEARTBEAT_TIMEOUT
    assert detection.evidence["last_step"] == 5
    # Virtual time: detected at the heartbeat deadline (1 + 3 s), not the startup one (60 s).
    assert at - start < 10.0


async def test_progress_says_the_last_step_and_its_age_also_after_the_worker_exited(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = Policy.from_dict({"recovery": {"heartbeat_timeout": 60.0}})
    monitor = Monitor(policy, lambda d: None)
    monitor.arm(0, pid=1234)
    monitor.arm(1, pid=1235)
    await trio.sleep(2.0)
    progress = monitor.progress()
    assert progress[0].step is None and progress[0].step_age is None  # no step yet
    assert progress[0].running_for == 2.0
    monitor.heartbeat(0, 7, {})
    await trio.sleep(5.0)
    assert (monitor.progress()[0].step, monitor.progress()[0].step_age) == (7, 5.0)  # silent
    monitor.heartbeat(0, 8, {})
    assert (monitor.progress()[0].step, monitor.progress()[0].step_age) == (8, 0.0)  # moving
    monitor.disarm()  # the workers exited (a recovery): where each rank stopped stays known
    await trio.sleep(1.0)
    after = monitor.progress()
    assert (after[0].step, after[0].step_age, after[0].running_for) == (8, 1.0, None)
    assert 1 not in after


# -- who hung: the rank that stopped stepping, not the ranks waiting for it -----------------


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Real processes to stand in for workers (their scheduler state is the evidence)."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _sleeper(procs: list[subprocess.Popen[bytes]]) -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    procs.append(proc)
    return proc.pid


def test_process_state_tells_a_stopped_process_from_a_sleeping_one(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    pid = _sleeper(sleepers)
    wait_until(
        lambda: proc_state(pid) is ProcState.SLEEPING, what="the sleeper to sleep", timeout_s=30
    )
    os.kill(pid, signal.SIGSTOP)
    wait_until(
        lambda: proc_state(pid) is ProcState.STOPPED, what="the sleeper to stop", timeout_s=30
    )
    os.kill(pid, signal.SIGCONT)
    wait_until(
        lambda: proc_state(pid) is ProcState.SLEEPING, what="the sleeper to go on", timeout_s=30
    )
    os.kill(pid, signal.SIGKILL)
    sleepers[0].wait()
    assert proc_state(pid) is ProcState.GONE


def _recorder() -> tuple[list[Detection], trio.Event, Callable[[Detection], None]]:
    seen: list[Detection] = []
    detected = trio.Event()

    def report(d: Detection) -> None:
        seen.append(d)
        detected.set()

    return seen, detected, report


async def _first_detection(
    monitor: Monitor, seen: list[Detection], detected: trio.Event
) -> Detection:
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        with trio.move_on_after(100.0):
            await detected.wait()
        nursery.cancel_scope.cancel()
    assert seen, "the hang was never detected"
    return seen[0]


async def test_a_stopped_rank_is_blamed_not_the_rank_blocked_waiting_for_it(
    autojump_clock: trio.testing.MockClock, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    # Two ranks in lockstep completed step 5; rank 1 is then stopped, rank 0 blocks in the
    # collective waiting for it. Rank 0 beat a moment earlier, so its deadline passes first.
    policy = Policy.from_dict({"recovery": {"heartbeat_timeout": 3.0}})
    seen, detected, report = _recorder()
    monitor = Monitor(policy, report)
    bystander, victim = _sleeper(sleepers), _sleeper(sleepers)
    wait_until(
        lambda: proc_state(bystander) is ProcState.SLEEPING, what="rank 0 to sleep", timeout_s=30
    )
    os.kill(victim, signal.SIGSTOP)
    wait_until(lambda: proc_state(victim) is ProcState.STOPPED, what="rank 1 to stop", timeout_s=30)
    monitor.arm(0, bystander)
    monitor.arm(1, victim)
    monitor.heartbeat(0, 5, {})
    await trio.sleep(0.01)
    monitor.heartbeat(1, 5, {})
    detection = await _first_detection(monitor, seen, detected)
    assert detection.trigger is Trigger.HEARTBEAT_TIMEOUT
    ev = detection.evidence
    assert (ev["rank"], ev["pid"], ev["state"], ev["last_step"]) == (1, victim, "stopped", 5)
    assert ev["blamed_by"] == "process_state"
    assert [b["rank"] for b in ev["stalled"]] == [1, 0]
    assert len(seen) == 1  # the bystander is reported with it, not on its own


async def test_among_sleeping_ranks_the_lowest_step_is_blamed(
    autojump_clock: trio.testing.MockClock, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    policy = Policy.from_dict({"recovery": {"heartbeat_timeout": 3.0}})
    seen, detected, report = _recorder()
    monitor = Monitor(policy, report)
    pids = [_sleeper(sleepers) for _ in range(3)]
    for pid in pids:
        wait_until(
            lambda pid=pid: proc_state(pid) is ProcState.SLEEPING, what="a sleeper", timeout_s=30
        )
    for rank, pid in enumerate(pids):
        monitor.arm(rank, pid)
    monitor.heartbeat(0, 7, {})  # rank 0 and 2 completed step 7, rank 1 only step 6
    monitor.heartbeat(1, 6, {})
    monitor.heartbeat(2, 7, {})

    async def healthy_rank_2() -> None:  # not in lockstep: it keeps stepping
        for step in range(8, 100):
            await trio.sleep(0.5)
            monitor.heartbeat(2, step, {})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(healthy_rank_2)
        detection = await _first_detection(monitor, seen, detected)
        nursery.cancel_scope.cancel()
    ev = detection.evidence
    assert (ev["rank"], ev["last_step"], ev["state"]) == (1, 6, "sleeping")
    assert ev["blamed_by"] == "last_step"
    assert [b["rank"] for b in ev["stalled"]] == [1, 0]  # rank 2 was stepping: no suspect


def test_blame_orders_by_state_then_step_then_the_oldest_beat() -> None:
    def beat(rank: int, step: int | None, at: float, state: ProcState) -> Beat:
        return Beat(rank, 100 + rank, step, at, 10.0, state)

    order = blame(
        [
            beat(0, 5, 1.0, ProcState.SLEEPING),
            beat(1, 5, 0.5, ProcState.SLEEPING),
            beat(2, 4, 2.0, ProcState.RUNNING),
            beat(3, 9, 3.0, ProcState.STOPPED),
            beat(4, 9, 3.0, ProcState.UNINTERRUPTIBLE),
            beat(5, None, 0.1, ProcState.SLEEPING),
        ]
    )
    assert [b.rank for b in order] == [3, 4, 5, 2, 1, 0]
    assert blamed_by(order) is BlamedBy.PROCESS_STATE
    assert blamed_by(order[2:]) is BlamedBy.LAST_STEP  # rank 5: no step yet, rank 2 at 4
    assert blamed_by(order[4:]) is BlamedBy.OLDEST_HEARTBEAT  # ranks 1 and 0, both at 5
    assert blamed_by(order[5:]) is BlamedBy.ALONE


def test_a_heartbeat_record_survives_the_wire_and_a_bad_one_is_named() -> None:
    b = Beat(3, 42, 17, 1700000000.123, 4.5, ProcState.STOPPED)
    assert Beat.from_wire(b.to_wire()) == b
    with pytest.raises(ValueError, match=r"bad heartbeat record.*state"):
        Beat.from_wire({**b.to_wire(), "state": "dozing"})
    with pytest.raises(ValueError, match=r"bad heartbeat record.*pid"):
        Beat.from_wire({k: v for k, v in b.to_wire().items() if k != "pid"})
