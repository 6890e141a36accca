"""A new agent's first heartbeats that find a peer's link still connecting go again within
milliseconds (a replacement or a standby taking over is heard at once, not one interval
later); past its first intervals, an undelivered beat waits for the next interval."""

from __future__ import annotations

import itertools
from typing import Any

import trio
import trio.testing

from supervise.cluster.failure_detector import DetectorConfig
from supervise.cluster.membership import Membership


class _Link:
    """Takes nothing until ``connected`` (trio time); records when each beat was tried."""

    rank = 0

    def __init__(self, connected: float) -> None:
        self.connected = connected
        self.tried: list[float] = []

    def handle(self, kind: Any, handler: Any, *, allow: Any = None) -> None: ...

    def unhandle(self, kind: Any, handler: Any = None) -> None: ...

    def try_send(self, peer: int, message: object) -> bool:
        self.tried.append(trio.current_time())
        return trio.current_time() >= self.connected


async def _beats(link: _Link, seconds: float) -> list[float]:
    membership = Membership(link, [1], DetectorConfig(interval=0.5, timeout=2.0))
    start = trio.current_time()
    with trio.move_on_after(seconds):
        await membership.run()
    return [round(t - start, 3) for t in link.tried]


async def test_a_beat_that_found_the_link_connecting_goes_again_at_once_and_only_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tried = await _beats(_Link(connected=0.03), 1.2)
    assert tried[:3] == [0.0, 0.02, 0.04]  # before: 0.0, 0.5 (heard one interval late)
    assert tried[3:] == [0.54, 1.04]  # delivered: the regular interval from then on
    # a peer still unreachable past the first intervals is not beaten faster
    never = await _beats(_Link(connected=1e9), 3.0)
    late = [t for t in never if t >= 1.0]
    assert late and all(round(b - a, 3) == 0.5 for a, b in itertools.pairwise(late))
