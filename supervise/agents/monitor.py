"""Monitor: notices what goes wrong with this node's workers and says so with evidence.

Hangs (no `Snapshotter.step` heartbeat within ``recovery.heartbeat_timeout``, or no first one
within ``recovery.startup_timeout`` of the spawn) and non-finite metrics (``recovery.on_nan``)
are seen here; worker exits are seen by the executor, peer loss by membership, corrupted
shards by the arena service. Every detection becomes a `Detection` handed to ``report``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import structlog
import trio

from supervise.policy import Policy
from supervise.telemetry import Trigger, get_telemetry

log = structlog.get_logger("supervise.agents.monitor")


@attrs.frozen(slots=True)
class Detection:
    """A failure seen on this node: what, since when (wall clock), noticed when, evidence."""

    trigger: Trigger
    since: float
    detected: float
    evidence: Mapping[str, Any]
    stop: bool = False  # the policy says stop training rather than recover (on_nan = "stop")


@attrs.frozen(slots=True)
class RankProgress:
    """How far one rank got, for `supervise status`: its last completed step (None: none yet)
    and the seconds since; the seconds its current worker has run (None: none watched)."""

    step: int | None
    step_age: float | None
    running_for: float | None


@attrs.define(slots=True)
class _Watch:
    pid: int
    spawned: float  # trio clock
    spawned_wall: float
    last_beat: float | None = None  # trio clock
    last_beat_wall: float | None = None
    last_step: int | None = None
    reported: bool = False


class Monitor:
    """Deadlines for the running workers' heartbeats, and the metrics they carry."""

    def __init__(self, policy: Policy, report: Callable[[Detection], None]) -> None:
        self._policy = policy
        self._report = report
        self._watches: dict[int, _Watch] = {}
        # rank -> (last step, trio time of its beat): kept across a worker's exit, so a
        # status during a recovery still says where each rank stopped.
        self._last: dict[int, tuple[int, float]] = {}
        self._wakeup = trio.Event()
        self._nan_warned = False

    # -- what the executor and the arena service tell us ----------------------------------

    def arm(self, rank: int, pid: int) -> None:
        """A worker for ``rank`` was spawned: its startup deadline starts now."""
        self._watches[rank] = _Watch(pid, trio.current_time(), time.time())
        self._wakeup.set()

    def disarm(self, rank: int | None = None) -> None:
        """Stop watching ``rank`` (every rank when None): it exited or is being stopped."""
        if rank is None:
            self._watches.clear()
        else:
            self._watches.pop(rank, None)

    def heartbeat(self, rank: int, step: int, metrics: Mapping[str, float]) -> None:
        """A worker completed ``step`` (the arena service's heartbeat hook)."""
        watch = self._watches.get(rank)
        if watch is None:
            return  # a late beat from a worker we already stopped
        if watch.last_beat is None:
            # The deadline moves from the startup timeout to the (usually shorter) heartbeat
            # timeout: the watch loop must recompute it now, not at the old deadline.
            self._wakeup.set()
        watch.last_beat = trio.current_time()
        watch.last_beat_wall = time.time()
        watch.last_step = step
        self._last[rank] = (step, watch.last_beat)
        get_telemetry().metrics.training_steps.add(1)
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad and not watch.reported:
            self._non_finite(rank, step, bad, watch)

    def progress(self) -> dict[int, RankProgress]:
        """Every rank seen so far: its last step and how long ago (trio clock, now)."""
        now = trio.current_time()
        out: dict[int, RankProgress] = {}
        for rank in sorted({*self._last, *self._watches}):
            last = self._last.get(rank)
            watch = self._watches.get(rank)
            out[rank] = RankProgress(
                step=None if last is None else last[0],
                step_age=None if last is None else max(0.0, now - last[1]),
                running_for=None if watch is None else max(0.0, now - watch.spawned),
            )
        return out

    # -- detections ------------------------------------------------------------------------

    def _non_finite(self, rank: int, step: int, bad: Mapping[str, float], w: _Watch) -> None:
        action = self._policy.recovery.on_nan
        evidence = {
            "rank": rank,
            "pid": w.pid,
            "step": step,
            "metrics": {k: str(v) for k, v in bad.items()},
        }
        if action == "ignore":
            if not self._nan_warned:
                log.warning("non-finite metric ignored (recovery.on_nan = ignore)", **evidence)
                self._nan_warned = True
            return
        w.reported = True
        now = time.time()
        log.error("non-finite metric", action=action, **evidence)
        self._report(Detection(Trigger.NAN, now, now, evidence, stop=action == "stop"))

    def _hang(self, rank: int, w: _Watch, now: float) -> None:
        w.reported = True
        wall = time.time()
        if w.last_beat is None:
            limit = self._policy.recovery.startup_timeout
            evidence: dict[str, Any] = {
                "rank": rank,
                "pid": w.pid,
                "no_heartbeat_since_spawn_s": round(now - w.spawned, 3),
                "startup_timeout_s": limit,
            }
            since = w.spawned_wall
        else:
            limit = self._policy.recovery.heartbeat_timeout
            evidence = {
                "rank": rank,
                "pid": w.pid,
                "last_step": w.last_step,
                "silent_for_s": round(now - w.last_beat, 3),
                "heartbeat_timeout_s": limit,
            }
            since = w.last_beat_wall if w.last_beat_wall is not None else wall
        log.error("worker hung", **evidence)
        self._report(Detection(Trigger.HEARTBEAT_TIMEOUT, since, wall, evidence))

    def _deadline(self, w: _Watch) -> float:
        r = self._policy.recovery
        if w.last_beat is None:
            return w.spawned + r.startup_timeout
        return w.last_beat + r.heartbeat_timeout

    async def run(
        self, *, task_status: trio.TaskStatus[Monitor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch the deadlines until cancelled."""
        task_status.started(self)
        while True:
            now = trio.current_time()
            pending = [(r, w) for r, w in self._watches.items() if not w.reported]
            for rank, w in pending:
                if now >= self._deadline(w):
                    self._hang(rank, w, now)
            upcoming = [self._deadline(w) for w in self._watches.values() if not w.reported]
            self._wakeup = trio.Event()
            with trio.move_on_at(min(upcoming, default=math.inf)):
                await self._wakeup.wait()
