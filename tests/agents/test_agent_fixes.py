"""Regressions found while building the demo: a membership change must not crash the
executor, and a hang right after a worker's first heartbeat is seen at heartbeat_timeout."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from supervise.agents.executor import Executor
from supervise.agents.monitor import Detection, Monitor
from supervise.cluster.failure_detector import Event, PeerBack, PeerLost
from supervise.policy import Policy
from supervise.telemetry import Trigger


async def test_membership_changes_are_logged_without_crashing_the_executor() -> None:
    rt: Any = SimpleNamespace(config=SimpleNamespace(rank=0), generation=0)
    executor = Executor(rt)
    send, receive = trio.open_memory_channel[Event](4)
    await send.send(PeerLost(rank=2, silence=2.0))
    await send.send(PeerBack(rank=2, incarnation=7, restarted=True))
    await send.aclose()
    await executor._membership_events(receive)  # raised TypeError before the fix


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
