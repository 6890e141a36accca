"""The executor takes membership changes (a peer lost, a peer back) before any coordinator is
attached: it logs them and goes on, without raising."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from supervise.agents.executor import Executor
from supervise.cluster.failure_detector import Event, PeerBack, PeerLost


async def test_peer_lost_and_back_without_a_coordinator_are_logged_without_raising() -> None:
    rt: Any = SimpleNamespace(config=SimpleNamespace(rank=0), generation=0)
    executor = Executor(rt)
    send, receive = trio.open_memory_channel[Event](4)
    await send.send(PeerLost(rank=2, silence=2.0))
    await send.send(PeerBack(rank=2, incarnation=7, restarted=True))
    await send.aclose()
    await executor._membership_events(receive)  # returns once the channel is closed
