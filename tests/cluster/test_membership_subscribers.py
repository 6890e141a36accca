"""A membership subscriber that does not keep up loses events, never the membership service."""

from __future__ import annotations

from typing import Any

from supervise.cluster.failure_detector import PeerLost
from supervise.cluster.membership import Membership


class _Link:
    rank = 0

    def handle(self, kind: Any, handler: Any, *, allow: Any = None) -> None: ...

    def unhandle(self, kind: Any, handler: Any = None) -> None: ...

    def try_send(self, peer: int, message: object) -> bool:
        return False


async def test_a_full_subscriber_drops_events_and_the_others_still_get_them() -> None:
    membership = Membership(_Link(), [1, 2])
    slow = membership.subscribe(buffer=1)
    fast = membership.subscribe(buffer=8)
    events = [PeerLost(1, 3.0), PeerLost(2, 3.0)]
    membership._emit(events)  # the second does not fit in slow's buffer: dropped, logged
    assert slow.receive_nowait() == events[0]
    assert [fast.receive_nowait(), fast.receive_nowait()] == events
