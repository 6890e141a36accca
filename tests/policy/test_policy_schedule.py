"""The capture schedule: steps, seconds, progress milestones and a new best metric."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

import supervise as sv
from supervise.policy import CaptureSchedule, ScheduleState
from supervise.policy.schedule import REASONS, milestone_steps


def run(
    schedule: CaptureSchedule,
    steps: list[int],
    *,
    times: list[float] | None = None,
    metrics: list[dict[str, float] | None] | None = None,
    state: ScheduleState | None = None,
) -> list[tuple[int, str]]:
    """Drive the schedule like the Snapshotter does; every capture commits."""
    state = state if state is not None else schedule.start(0.0)
    captured = []
    for i, step in enumerate(steps):
        now = times[i] if times is not None else float(i)
        m = metrics[i] if metrics is not None else None
        reason = schedule.decide(state, step, now, m)
        if reason is not None:
            captured.append((step, reason))
            state = schedule.record(state, step, now, m)
    return captured


increasing_steps = st.lists(
    st.integers(min_value=0, max_value=5000), min_size=1, max_size=60, unique=True
).map(sorted)


def test_every_steps_captures_multiples_from_step_zero() -> None:
    schedule = CaptureSchedule(every_steps=10)
    assert run(schedule, list(range(35))) == [
        (0, "steps"),
        (10, "steps"),
        (20, "steps"),
        (30, "steps"),
    ]


def test_after_a_restore_the_schedule_carries_on() -> None:
    schedule = CaptureSchedule(every_steps=10)
    state = schedule.start(100.0, step=37)
    assert [s for s, _ in run(schedule, list(range(38, 61)), state=state)] == [40, 50, 60]


def test_a_fresh_state_captures_the_first_step_it_sees() -> None:
    schedule = CaptureSchedule(every_steps=10)
    assert run(schedule, [7, 8, 9, 10]) == [(7, "steps"), (10, "steps")]


def test_the_same_step_is_not_captured_twice() -> None:
    schedule = CaptureSchedule(every_steps=1, every_seconds=1.0)
    state = schedule.record(schedule.start(0.0), 5, 0.0)
    assert schedule.decide(state, 5, 1e9) is None


def test_a_rollback_recaptures_multiples() -> None:
    schedule = CaptureSchedule(every_steps=10)
    state = schedule.record(schedule.start(0.0), 30, 0.0)
    assert schedule.decide(state, 20, 1.0) == "steps"
    assert schedule.decide(state, 21, 1.0) is None


@given(st.integers(min_value=1, max_value=100), increasing_steps)
def test_steps_capture_exactly_when_a_multiple_was_reached(every: int, steps: list[int]) -> None:
    schedule = CaptureSchedule(every_steps=every)
    captured = {s for s, _ in run(schedule, steps)}
    expected = {steps[0]} | {b for a, b in itertools.pairwise(steps) if b // every > a // every}
    assert captured == expected


@given(
    st.floats(min_value=0.01, max_value=100),
    st.lists(st.floats(min_value=0, max_value=50), min_size=1, max_size=60),
)
def test_seconds_capture_when_the_interval_passed(every: float, gaps: list[float]) -> None:
    times = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    schedule = CaptureSchedule(every_seconds=every)
    captured = run(schedule, list(range(len(times))), times=times)
    last = 0.0
    captured_steps = {s for s, _ in captured}
    for step, now in enumerate(times):
        if step in captured_steps:
            assert now - last >= every
            last = now
        else:
            assert now - last < every
    assert all(reason == "seconds" for _, reason in captured)


@given(
    st.integers(min_value=1, max_value=2000),
    st.lists(
        st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True),
        min_size=1,
        max_size=6,
        unique=True,
    ),
)
def test_milestones_fire_at_the_step_that_reaches_them(total: int, fractions: list[float]) -> None:
    schedule = CaptureSchedule(milestones=tuple(fractions), total_steps=total)
    captured = run(schedule, list(range(total)))
    assert all(reason == "milestone" for _, reason in captured)
    expected = set()
    for f in fractions:
        exact = Fraction(repr(f))
        # the first step after which progress (step + 1) / total reaches the fraction
        step = next(s for s in range(total) if Fraction(s + 1, total) >= exact)
        expected.add(step)
    assert {s for s, _ in captured} == expected == set(schedule.milestone_step_numbers)


def test_milestones_in_decimal() -> None:
    # 0.7 * 10 is 7.000000000000001 in floats; the milestone is still step 6 (7 of 10 steps)
    assert milestone_steps((0.7, 0.25, 0.5), 10) == (2, 4, 6)
    assert milestone_steps((0.001,), 10) == (0,)
    assert milestone_steps((0.999,), 10) == (9,)


@given(
    st.integers(min_value=10, max_value=2000),
    st.lists(
        st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True),
        min_size=1,
        max_size=6,
        unique=True,
    ),
    increasing_steps,
)
def test_skipped_milestones_are_captured_late_not_lost(
    total: int, fractions: list[float], steps: list[int]
) -> None:
    schedule = CaptureSchedule(milestones=tuple(fractions), total_steps=total)
    captured = [s for s, _ in run(schedule, steps)]
    for target in schedule.milestone_step_numbers:
        reached = [s for s in steps if s >= target]
        if reached:
            assert any(target <= c <= reached[0] for c in captured)


def test_milestones_are_inert_without_total_steps() -> None:
    schedule = CaptureSchedule(milestones=(0.5,))
    assert schedule.milestone_step_numbers == ()
    assert run(schedule, list(range(100))) == []


metric_values = st.one_of(st.none(), st.floats(min_value=-1e6, max_value=1e6), st.just(math.nan))


@given(st.sampled_from(["min", "max"]), st.lists(metric_values, min_size=1, max_size=80))
def test_best_captures_exactly_the_improvements(mode: str, values: list[float | None]) -> None:
    schedule = CaptureSchedule(metric="loss", mode=mode)  # type: ignore[arg-type]
    metrics = [None if v is None else {"loss": v} for v in values]
    captured = run(schedule, list(range(len(values))), metrics=metrics)
    best: float | None = None
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    expected = []
    for step, v in enumerate(values):
        if v is not None and not math.isnan(v) and (best is None or better(v, best)):
            expected.append((step, "best"))
            best = v
    assert captured == expected


def test_best_ignores_other_metrics_and_rejects_non_numbers() -> None:
    schedule = CaptureSchedule(metric="loss")
    state = schedule.start(0.0)
    assert schedule.decide(state, 1, 0.0, {"accuracy": 0.5}) is None
    assert schedule.decide(state, 1, 0.0, {"loss": 2}) == "best"
    with pytest.raises(ValueError, match="metric 'loss' must be a number"):
        schedule.decide(state, 1, 0.0, {"loss": "low"})  # type: ignore[dict-item]


def test_best_restarts_from_the_given_best() -> None:
    schedule = CaptureSchedule(metric="loss")
    state = schedule.start(0.0, step=100, best=0.5)
    assert schedule.decide(state, 101, 0.0, {"loss": 0.6}) is None
    assert schedule.decide(state, 101, 0.0, {"loss": 0.4}) == "best"


def test_record_tracks_the_best_among_captures_for_any_reason() -> None:
    schedule = CaptureSchedule(every_steps=10, metric="loss")
    state = schedule.record(schedule.start(0.0), 10, 1.0, {"loss": 0.3})
    assert state == ScheduleState(last_step=10, last_time=1.0, best=0.3)
    assert schedule.decide(state, 11, 2.0, {"loss": 0.35}) is None
    state = schedule.record(state, 20, 3.0, {"loss": 0.9})
    assert state.best == 0.3


schedules = st.builds(
    CaptureSchedule,
    every_steps=st.integers(min_value=0, max_value=20),
    every_seconds=st.sampled_from([0.0, 0.5, 3.0]),
    metric=st.sampled_from(["", "loss"]),
    milestones=st.sampled_from([(), (0.5,), (0.1, 0.9)]),
    total_steps=st.sampled_from([None, 50, 200]),
)


@given(
    schedules,
    st.lists(
        st.tuples(st.integers(0, 300), st.floats(0, 10), metric_values), min_size=1, max_size=40
    ),
)
def test_triggers_combine_with_or(schedule: CaptureSchedule, calls: list) -> None:
    singles = [
        CaptureSchedule(every_steps=schedule.every_steps),
        CaptureSchedule(every_seconds=schedule.every_seconds),
        CaptureSchedule(metric=schedule.metric),
        CaptureSchedule(milestones=schedule.milestones, total_steps=schedule.total_steps),
    ]
    state = schedule.start(0.0)
    for step, now, value in calls:
        metrics = None if value is None else {"loss": value}
        reason = schedule.decide(state, step, now, metrics)
        fired = [s.decide(state, step, now, metrics) for s in singles]
        fired = [r for r in fired if r is not None]
        if reason is None:
            assert fired == []
        else:
            assert reason in fired
            assert REASONS.index(reason) == min(REASONS.index(r) for r in fired)
            state = schedule.record(state, step, now, metrics)


def test_reasons_priority() -> None:
    schedule = CaptureSchedule(
        every_steps=10, every_seconds=1.0, metric="loss", milestones=(0.5,), total_steps=21
    )
    state = schedule.start(0.0)
    assert schedule.decide(state, 10, 5.0, {"loss": 1.0}) == "milestone"
    assert schedule.decide(state, 20, 5.0, {"loss": 1.0}) == "milestone"  # crossed since start
    state = schedule.record(state, 10, 5.0, {"loss": 1.0})
    assert schedule.decide(state, 20, 5.0, {"loss": 0.5}) == "best"
    assert schedule.decide(state, 20, 5.0, {"loss": 2.0}) == "steps"
    assert schedule.decide(state, 15, 6.0, {"loss": 2.0}) == "seconds"
    assert schedule.decide(state, 15, 5.5, {"loss": 2.0}) is None


def test_everything_off_never_captures() -> None:
    schedule = CaptureSchedule()
    assert run(schedule, list(range(50)), metrics=[{"loss": -i} for i in range(50)]) == []


def test_compiled_from_a_policy() -> None:
    policy = sv.Policy(
        snapshot=sv.SnapshotSchedule(
            every_steps=5, every_seconds="1m", on_best="acc", milestones=(0.5,)
        ),
        retention=sv.Retention(best_metric="acc", best_mode="max", keep_best=1),
    )
    schedule = CaptureSchedule.from_policy(policy, total_steps=100)
    assert schedule == CaptureSchedule(
        every_steps=5,
        every_seconds=60.0,
        metric="acc",
        mode="max",
        milestones=(0.5,),
        total_steps=100,
    )
    assert schedule.milestone_step_numbers == (49,)
    assert CaptureSchedule.from_schedule(policy.snapshot).mode == "min"


def test_compiled_schedule_validates() -> None:
    with pytest.raises(sv.InvalidValue, match="total_steps"):
        CaptureSchedule(total_steps=0)
    with pytest.raises(sv.InvalidValue, match=r"milestones\[0\]"):
        CaptureSchedule(milestones=(1.5,), total_steps=10)
    with pytest.raises(sv.InvalidValue, match=r"milestones\[1\]"):
        CaptureSchedule(milestones=(0.5, "x"))  # type: ignore[arg-type]
    assert CaptureSchedule(milestones=[0.5, 0.25]).milestones == (0.25, 0.5)  # type: ignore[arg-type]
    with pytest.raises(sv.InvalidValue, match="mode"):
        CaptureSchedule(mode="best")  # type: ignore[arg-type]
    with pytest.raises(sv.InvalidValue, match="every_steps"):
        CaptureSchedule(every_steps=-1)
