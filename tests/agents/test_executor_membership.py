"""The executor follows membership changes: logs them and hands them to the coordinator."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from supervise.agents.executor import Executor
from supervise.cluster.failure_detector import Event, PeerBack, PeerLost


class _Coordinator:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def membership_event(self, event: Event) -> None:
        self.events.append(event)


async def test_peer_lost_and_back_reach_the_coordinator() -> None:
    ctx: Any = SimpleNamespace(config=SimpleNamespace(rank=0))
    executor = Executor(ctx)
    coordinator = _Coordinator()
    executor.coordinator = coordinator
    send, receive = trio.open_memory_channel[Event](4)
    events = [PeerLost(1, 2.5), PeerBack(1, 7, restarted=True)]
    for ev in events:
        send.send_nowait(ev)
    send.close()
    await executor._membership_events(receive)  # returns once the channel is closed
    assert coordinator.events == events
