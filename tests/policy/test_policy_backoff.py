"""The recovery backoff (the runtime's Backoff) as a pure decision, property-tested."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import supervise as sv

from .strategies import backoff

uniform = st.floats(min_value=0, max_value=1, exclude_max=True)
attempts = st.integers(min_value=1, max_value=10_000)


def base(b: sv.Backoff, n: int) -> float:
    """The un-jittered delay, computed independently in log space."""
    if b.initial == 0:
        return 0.0
    log = math.log(b.initial) + (n - 1) * math.log(b.multiplier)
    return b.max if log >= math.log(b.max) else min(b.max, math.exp(log))


@given(backoff(), st.lists(attempts, min_size=2, max_size=20), uniform)
def test_delays_grow_monotonically_to_the_cap(b: sv.Backoff, ns: list[int], u: float) -> None:
    ns = sorted(ns)
    delays = [b.delay(n, u) for n in ns]
    assert delays == sorted(delays)
    top = b.max * (1 + b.jitter)
    assert all(0 <= d <= top * (1 + 1e-12) for d in delays)


@given(backoff(), attempts)
def test_delay_follows_the_formula(b: sv.Backoff, n: int) -> None:
    assert b.delay(n) == pytest.approx(base(b, n), rel=1e-9, abs=1e-300)


@given(backoff(), attempts, uniform)
def test_jitter_stays_in_bounds(b: sv.Backoff, n: int, u: float) -> None:
    middle = b.delay(n)
    d = b.delay(n, u)
    assert middle * (1 - b.jitter) * (1 - 1e-12) <= d <= middle * (1 + b.jitter) * (1 + 1e-12)


@given(backoff())
def test_the_cap_is_reached(b: sv.Backoff) -> None:
    if b.initial > 0 and b.multiplier > 1:
        needed = math.log(b.max / b.initial) / math.log(b.multiplier)
        assert b.delay(math.ceil(needed) + 2) == b.max


@given(backoff(), st.integers(max_value=0))
def test_no_delay_before_the_first_attempt(b: sv.Backoff, n: int) -> None:
    assert b.delay(n) == 0.0


@given(backoff(), st.floats(min_value=0, max_value=1e8))
def test_the_count_resets_after_a_stable_period(b: sv.Backoff, ran_for: float) -> None:
    expected = b.reset_after is not None and ran_for >= b.reset_after
    assert b.should_reset(ran_for) is expected


@given(backoff(), st.lists(st.floats(min_value=0, max_value=2e7), min_size=1, max_size=30))
def test_consecutive_count_restarts_after_a_stable_run(b: sv.Backoff, runs: list[float]) -> None:
    # How a supervisor or the recovery Executor uses it: after each failure, the child's run
    # time decides whether the count restarts; the delay grows within a streak only.
    n, previous = 0, 0.0
    for ran_for in runs:
        n = 1 if b.should_reset(ran_for) else n + 1
        delay = b.delay(n)
        if n == 1:
            assert delay == b.initial
        else:
            assert delay >= previous
        previous = delay


def test_extreme_values_do_not_overflow() -> None:
    assert sv.Backoff(initial=1e-300, max=1e300, multiplier=1e10).delay(100) == 1e300
    assert sv.Backoff(initial=5e-324, max=1.0, multiplier=2).delay(2000) == 1.0
    assert sv.Backoff(initial=1.0, max=math.inf, multiplier=2).delay(5000) == math.inf
    assert sv.Backoff(initial=1.0, max=60.0, multiplier=3).delay(10**30) == 60.0
