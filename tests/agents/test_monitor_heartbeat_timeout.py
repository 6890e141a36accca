"""The monitor's deadlines: once a worker has sent a heartbeat, its silence is a hang after
``heartbeat_timeout``, not after the (much longer) ``startup_timeout``; and the progress it
reports (`supervise status`): each rank's last step and how long ago."""

from __future__ import annotations

import trio
import trio.testing

from supervise.agents.monitor import Detection, Monitor
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
