"""The adaptive hang detector, in virtual time: a rank's silence is a hang within a few of its
normal step times; never on the first steps (no history: the timeout rules), inside a
`Snapshotter.pause` block, or under jitter within the threshold; ``heartbeat_timeout`` stays
the upper bound."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import trio
import trio.testing

from supervise.agents.hang_detector import MIN_SAMPLES, WINDOW, HangRule, History, StepPace
from supervise.agents.monitor import Beat, Detection, Monitor, ProcState
from supervise.policy import Cluster, Policy, Recovery
from supervise.telemetry import Trigger

PID = 1234  # no such worker: its process state is only evidence


def policy(**recovery: Any) -> Policy:
    return Policy.from_dict(
        {
            "recovery": {"heartbeat_timeout": 60.0, **recovery},
            "cluster": {"heartbeat_interval": 0.1},
        }
    )


async def detections(
    pol: Policy,
    script: Callable[[Monitor], Any],
    *,
    ranks: Iterable[int] = (0,),
    watch_s: float = 300.0,
) -> list[tuple[float, Detection]]:
    """Run ``script(monitor)`` with the monitor watching ``ranks``, then ``watch_s`` more of
    silence; every detection with its (virtual) time."""
    seen: list[tuple[float, Detection]] = []
    monitor = Monitor(pol, lambda d: seen.append((trio.current_time(), d)))
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        for rank in ranks:
            monitor.arm(rank, PID)
        await script(monitor)
        await trio.sleep(watch_s)
        nursery.cancel_scope.cancel()
    return seen


def steps(intervals: Iterable[float], rank: int = 0, first: int = 0) -> Callable[[Monitor], Any]:
    async def run(monitor: Monitor) -> None:
        for step, interval in enumerate(intervals, start=first):
            await trio.sleep(interval)
            monitor.heartbeat(rank, step, {"loss": 1.0})

    return run


async def test_a_hang_is_flagged_within_a_few_step_times_not_at_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pol = policy(hang_min_silence=0.5)  # defaults: phi 8, 5 typical steps
    start = trio.current_time()
    seen = await detections(pol, steps([0.2] * 20))
    last_beat = start + 20 * 0.2
    assert len(seen) == 1
    at, d = seen[0]
    assert d.trigger is Trigger.HEARTBEAT_TIMEOUT and d.evidence["last_step"] == 19
    assert at - last_beat == pytest.approx(5 * 0.2)  # 5 typical steps, not 60 s
    assert d.evidence["limit_s"] == pytest.approx(1.0)
    assert d.evidence["heartbeat_timeout_s"] == 60.0


async def test_no_alarm_on_the_first_steps_the_timeout_rules_until_the_history_exists(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pol = policy(hang_min_silence=0.5)
    # a slow first step, then fewer intervals than the history needs: silence of 30 s is fine
    start = trio.current_time()
    seen = await detections(pol, steps([5.0] + [0.2] * (MIN_SAMPLES - 1)), watch_s=300.0)
    last_beat = start + 5.0 + 0.2 * (MIN_SAMPLES - 1)
    assert [at - last_beat for at, _ in seen] == [pytest.approx(60.0)]
    assert seen[0][1].evidence["limit_s"] == 60.0


async def test_timeout_mode_and_the_timeout_as_the_upper_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # steps of 1 s: 5 typical steps would be 5 s, but the timeout (2 s) is the bound
    start = trio.current_time()
    seen = await detections(policy(heartbeat_timeout=2.0), steps([1.0] * 20))
    assert [at - (start + 20.0) for at, _ in seen] == [pytest.approx(2.0)]
    # hang_detection = "timeout": the history is not used
    start = trio.current_time()
    seen = await detections(policy(hang_detection="timeout"), steps([0.2] * 20))
    assert [at - (start + 4.0) for at, _ in seen] == [pytest.approx(60.0)]


async def test_no_alarm_inside_a_pause_only_the_timeout_from_its_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pol = policy(hang_min_silence=0.5)

    async def evaluate_then_train(monitor: Monitor) -> None:
        await steps([0.2] * 20)(monitor)
        monitor.pause(0, True)  # an evaluation of 45 s: longer than any step, under 60 s
        await trio.sleep(45.0)
        monitor.pause(0, False)
        await steps([0.2] * 20, first=20)(monitor)  # training goes on: no alarm so far
        monitor.pause(0, True)  # then a "phase" that never ends: the timeout from its start

    start = trio.current_time()
    seen = await detections(pol, evaluate_then_train)
    paused_at = start + 4.0 + 45.0 + 4.0
    assert [at - paused_at for at, _ in seen] == [pytest.approx(60.0)]
    assert seen[0][1].evidence["last_step"] == 39


async def test_after_a_pause_the_usual_bound_counts_from_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pol = policy(hang_min_silence=0.5)

    async def evaluate_then_hang(monitor: Monitor) -> None:
        await steps([0.2] * 20)(monitor)
        monitor.pause(0, True)
        await trio.sleep(45.0)
        monitor.pause(0, False)  # ... and then no step comes

    start = trio.current_time()
    seen = await detections(pol, evaluate_then_hang)
    resumed = start + 4.0 + 45.0
    assert [at - resumed for at, _ in seen] == [pytest.approx(1.0)]


async def test_a_busy_process_past_its_history_is_left_to_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # After its last step a rank saves its model (busy: a core's worth of CPU time) without
    # a pause: not hung by the step history, only at the timeout if it never ends.
    seen: list[tuple[float, Detection]] = []
    busy = {"on": False}

    def cpu(pid: int) -> float:
        return trio.current_time() if busy["on"] else 0.0

    monitor = Monitor(
        policy(hang_min_silence=0.5), lambda d: seen.append((trio.current_time(), d)), cpu=cpu
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        monitor.arm(0, PID)
        await steps([0.2] * 20)(monitor)
        busy["on"] = True
        await trio.sleep(30.0)
        assert seen == []  # 30 s busy: no verdict by the history
        busy["on"] = False
        await steps([0.2] * 3, first=20)(monitor)  # steps again: the history judges again
        last = trio.current_time()
        await trio.sleep(300.0)
        nursery.cancel_scope.cancel()
    assert [at - last for at, _ in seen] == [pytest.approx(1.0)]  # idle: a hang


async def test_no_verdict_by_the_history_while_a_peer_node_is_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A node loss stalls the ranks here too (they wait for the lost ranks in a collective):
    # the membership's peer_lost must name it, not a hang of the survivors. The verdict waits
    # while a peer node is silent, and comes once the peer is heard again.
    seen: list[tuple[float, Detection]] = []
    quiet_since: dict[str, float | None] = {"t": None}

    def peers_quiet_for() -> float:
        t = quiet_since["t"]
        return 0.0 if t is None else trio.current_time() - t

    monitor = Monitor(
        Policy.from_dict({"recovery": {"heartbeat_timeout": 60.0, "hang_min_silence": 0.5}}),
        lambda d: seen.append((trio.current_time(), d)),
        peers_quiet_for=peers_quiet_for,
    )  # membership heartbeats every 1 s: no verdict before 3 s (a quiet peer is 2 s)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        monitor.arm(0, PID)
        await steps([0.2] * 20)(monitor)
        quiet_since["t"] = trio.current_time()  # the peer node went silent with our last step
        await trio.sleep(8.0)
        assert seen == []  # 8 s: past the history's 3 s, the peer still silent
        quiet_since["t"] = None  # heard again (it was only slow): the verdict comes
        back = trio.current_time()
        await trio.sleep(60.0)
        nursery.cancel_scope.cancel()
    assert len(seen) == 1
    assert seen[0][0] - back <= 1.0  # within a membership heartbeat interval


def test_the_interval_spanning_a_pause_stays_out_of_the_history() -> None:
    rule = HangRule.from_policy(
        Policy(recovery=Recovery(hang_min_silence=0.1), cluster=Cluster(heartbeat_interval=0.01))
    )
    pace = StepPace(rule)
    assert pace.limit() is None  # no heartbeat yet: the startup rule is the caller's
    for t in range(MIN_SAMPLES + 1):
        pace.beat(float(t))
    assert (pace.samples, pace.limit()) == (MIN_SAMPLES, pytest.approx(5.0))
    pace.pause(10.0)
    pace.beat(50.0)  # a step inside the pause: not an interval of the history
    pace.resume(70.0)
    assert pace.limit() == pytest.approx(20.0 + 5.0)  # from the resume
    pace.beat(71.0)  # the first step after the pause: spans it, not recorded either
    assert pace.samples == MIN_SAMPLES
    pace.beat(72.0)
    assert pace.samples == MIN_SAMPLES + 1


async def test_no_alarm_under_jitter_within_the_threshold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(7)
    # a loaded machine: steps of 50-150 ms, and a 2.5 s stall every 40 steps (under the 3 s
    # floor); then silence, flagged at the floor
    jitter = [2.5 if i % 40 == 39 else rng.uniform(0.05, 0.15) for i in range(400)]
    start = trio.current_time()
    seen = await detections(policy(), steps(jitter))
    assert [at - (start + sum(jitter)) for at, _ in seen] == [pytest.approx(3.0)]
    # a capture every 5 steps makes every 5th step slow (1.5 s against 0.2 s): improbable
    # silences are judged by the whole history (phi), not only the median step
    slow = [1.5 if i % 5 == 4 else 0.2 for i in range(100)]
    start = trio.current_time()
    seen = await detections(policy(hang_min_silence=0.5), steps(slow))
    assert len(seen) == 1
    at, d = seen[0]
    assert 1.5 < at - (start + sum(slow)) < 60.0
    assert d.evidence["limit_s"] == pytest.approx(at - (start + sum(slow)), abs=1e-3)


async def test_the_rank_waiting_for_the_hung_one_is_reported_with_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two ranks in lockstep; rank 1 stops after step 19, rank 0 blocks waiting for it (its
    # last beat a moment later): both are stalled against their own, adaptive limits.
    async def lockstep(monitor: Monitor) -> None:
        for step in range(20):
            await trio.sleep(0.2)
            monitor.heartbeat(1, step, {})
            monitor.heartbeat(0, step, {})

    seen = await detections(policy(hang_min_silence=0.5), lockstep, ranks=(0, 1))
    assert len(seen) == 1
    evidence = seen[0][1].evidence
    assert evidence["rank"] == 1  # the oldest heartbeat: the same state and step
    assert sorted(b["rank"] for b in evidence["stalled"]) == [0, 1]
    assert all(b["limit_s"] == pytest.approx(1.0) for b in evidence["stalled"])


def test_a_beat_with_its_limit_survives_the_wire_and_judges_stalled_by_it() -> None:
    recovery = Recovery(heartbeat_timeout=60.0)
    b = Beat(3, 42, 17, 1700000000.123, 0.6, ProcState.SLEEPING, 1.0)
    assert Beat.from_wire(b.to_wire()) == b
    assert b.stalled(recovery)  # 0.6 s of its 1 s limit
    old = {k: v for k, v in b.to_wire().items() if k != "limit_s"}  # an older agent's record
    assert Beat.from_wire(old).limit_s is None
    assert not Beat.from_wire(old).stalled(recovery)  # judged by the timeout: 0.6 of 60 s


def test_the_history_keeps_the_newest_window_with_its_statistics() -> None:
    rng = random.Random(3)
    history, seen = History(), []
    for _ in range(5 * WINDOW + 7):
        x = rng.expovariate(3.0)
        history.add(x)
        seen.append(x)
        window = seen[-WINDOW:]
        assert len(history) == len(window)
        assert history.mean() == pytest.approx(statistics.fmean(window))
        assert history.std() == pytest.approx(statistics.pstdev(window), abs=1e-9)
        assert history.median() == statistics.median(window)
