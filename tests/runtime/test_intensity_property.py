"""Restart intensity against a reference model of OTP's algorithm, on random crash schedules."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import supervise as sv


def reference_gives_up_at(
    crash_times: list[float], max_restarts: int, max_seconds: float
) -> int | None:
    """Index of the crash at which OTP gives up (restarts within [t - max_seconds, t])."""
    restarts: list[float] = []
    for i, t in enumerate(crash_times):
        restarts = [r for r in restarts if r >= t - max_seconds] + [t]
        if len(restarts) > max_restarts:
            return i
    return None


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(
        st.integers(min_value=0, max_value=40).map(lambda q: q / 4), min_size=1, max_size=12
    ),
    max_restarts=st.integers(min_value=0, max_value=4),
    max_seconds=st.integers(min_value=1, max_value=20).map(lambda q: q / 2),
)
def test_intensity_matches_the_reference(
    gaps: list[float], max_restarts: int, max_seconds: float
) -> None:
    # crash i happens gaps[i] seconds after incarnation i started (restarts are immediate)
    crash_times: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        crash_times.append(now)
    expected = reference_gives_up_at(crash_times, max_restarts, max_seconds)

    starts: list[float] = []

    async def child() -> None:
        starts.append(trio.current_time())
        i = len(starts) - 1
        if i < len(gaps):
            await trio.sleep(gaps[i])
            raise RuntimeError(f"crash {i}")
        await trio.sleep_forever()

    async def main() -> bool:
        sup = sv.Supervisor(
            [sv.child(child, id="c")], max_restarts=max_restarts, max_seconds=max_seconds
        )
        with trio.move_on_after(1000):
            try:
                await sup.run()
            except sv.GaveUp:
                return True
        return False

    gave_up = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert gave_up is (expected is not None)
    assert len(starts) == (expected + 1 if expected is not None else len(gaps) + 1)
