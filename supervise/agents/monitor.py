"""Monitor: notices what goes wrong with this node's workers and says so with evidence.

Hangs (no `Snapshotter.step` heartbeat for longer than the rank's own step history makes
probable — `hang_detector` — and never longer than ``recovery.heartbeat_timeout``; no first
one within ``recovery.startup_timeout`` of the spawn) and non-finite metrics
(``recovery.on_nan``) are seen here; worker exits are seen by the executor, peer loss by
membership, corrupted shards by the arena service. Every detection becomes a `Detection`
handed to ``report``.

A hang stops every rank that waits for the hung one in a collective, so silence alone does not
say who hung: a hang's evidence lists every stalled rank's `Beat` (last step, when, the
process's state) and names the one `blame` puts first (a stopped, dead or uninterruptible
process, then the lowest last step, then the oldest heartbeat). The coordinator applies the
same rule across nodes.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from supervise.agents.hang_detector import QUIET_PEER_BEATS, HangRule, StepPace
from supervise.policy import Policy, Recovery
from supervise.runtime.procfs import cpu_seconds, stat_fields
from supervise.telemetry import Trigger, get_telemetry

log = structlog.get_logger("supervise.agents.monitor")

#: A rank silent for this fraction of its timeout when another rank's expires stalled with it.
STALLED_FRACTION = 0.5
#: Before a step history's verdict, the process's CPU time is read this long (at most: half
#: the limit) ahead of it; a process that used this fraction of a core meanwhile is busy
#: (a long phase nobody announced: the end of training, a final save), not stuck, and is left
#: to the timeout. A stopped, deadlocked or waiting process uses next to none.
BUSY_WINDOW_S = 1.0
BUSY_CPU_FRACTION = 0.25
#: The least window the CPU time is compared over (a loop that woke late takes a new mark).
MIN_BUSY_WINDOW_S = 0.1


class ProcState(enum.StrEnum):
    """A worker process's scheduler state (``/proc/<pid>/stat``), as hang evidence."""

    RUNNING = "running"
    SLEEPING = "sleeping"  # also a rank blocked in a collective, waiting for a hung peer
    UNINTERRUPTIBLE = "uninterruptible"  # stuck in the kernel (I/O, a driver)
    STOPPED = "stopped"  # SIGSTOP, or a debugger
    ZOMBIE = "zombie"  # exited, not yet reaped
    GONE = "gone"  # no such process any more
    UNKNOWN = "unknown"  # no /proc to ask

    @property
    def suspicion(self) -> int:
        """0: this process cannot be stepping; 1: probably not; 2: it may be a bystander."""
        if self in (ProcState.STOPPED, ProcState.ZOMBIE, ProcState.GONE):
            return 0
        if self is ProcState.UNINTERRUPTIBLE:
            return 1
        return 2


_STATE_LETTERS: dict[str, ProcState] = {
    "R": ProcState.RUNNING,
    "S": ProcState.SLEEPING,
    "I": ProcState.SLEEPING,
    "D": ProcState.UNINTERRUPTIBLE,
    "T": ProcState.STOPPED,
    "t": ProcState.STOPPED,
    "Z": ProcState.ZOMBIE,
    "X": ProcState.GONE,
}


def proc_state(pid: int) -> ProcState:
    """The scheduler state of process ``pid`` (Linux ``/proc``; UNKNOWN elsewhere)."""
    try:
        fields = stat_fields(pid)
    except FileNotFoundError:
        return ProcState.GONE if Path("/proc/self/stat").exists() else ProcState.UNKNOWN
    except OSError:
        return ProcState.UNKNOWN
    return _STATE_LETTERS.get(fields[0], ProcState.UNKNOWN) if fields else ProcState.UNKNOWN


@attrs.frozen(slots=True)
class Beat:
    """One rank's heartbeat record when a hang is judged: its last completed step (None: none
    since the spawn), when that was (wall clock; the spawn's when none), how long it has been
    silent, its process's state, and the silence that makes it hung (``limit_s``; None: not
    known, the policy's timeout)."""

    rank: int = attrs.field(validator=attrs.validators.instance_of(int))
    pid: int = attrs.field(validator=attrs.validators.instance_of(int))
    last_step: int | None = attrs.field(
        validator=attrs.validators.optional(attrs.validators.instance_of(int))
    )
    last_beat: float = attrs.field(validator=attrs.validators.instance_of((int, float)))
    silent_for_s: float = attrs.field(validator=attrs.validators.instance_of((int, float)))
    state: ProcState = attrs.field(converter=ProcState)
    limit_s: float | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.instance_of((int, float))),
    )

    def limit(self, recovery: Recovery) -> float:
        """The silence that makes this rank hung: its own, else the policy's timeout
        (heartbeat, or startup before the first heartbeat)."""
        if self.limit_s is not None:
            return self.limit_s
        return recovery.startup_timeout if self.last_step is None else recovery.heartbeat_timeout

    def stalled(self, recovery: Recovery) -> bool:
        """Silent for at least `STALLED_FRACTION` of its limit: stopped together with
        whichever rank hung."""
        return self.silent_for_s >= STALLED_FRACTION * self.limit(recovery)

    def suspicion(self) -> tuple[int, int, float]:
        """The order `blame` sorts by: process state, last step, time of the last beat."""
        step = -1 if self.last_step is None else self.last_step
        return (self.state.suspicion, step, self.last_beat)

    def to_wire(self) -> dict[str, Any]:
        """As evidence and on the wire (msgpack: a map with string keys)."""
        return {
            "rank": self.rank,
            "pid": self.pid,
            "last_step": self.last_step,
            "last_beat": round(self.last_beat, 3),
            "silent_for_s": round(self.silent_for_s, 3),
            "state": self.state.value,
            "limit_s": None if self.limit_s is None else round(self.limit_s, 3),
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Beat:
        """Back from `to_wire`; ValueError naming what is wrong."""
        try:
            step, limit = data["last_step"], data.get("limit_s")
            return cls(
                int(data["rank"]),
                int(data["pid"]),
                None if step is None else int(step),
                float(data["last_beat"]),
                float(data["silent_for_s"]),
                ProcState(data["state"]),
                None if limit is None else float(limit),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad heartbeat record {dict(data)!r}: {exc!r}") from None


def blame(beats: Iterable[Beat]) -> list[Beat]:
    """The stalled ranks, the one that stopped stepping first first: a process that cannot
    be stepping (stopped, dead, stuck in the kernel) before one that may be waiting for it,
    then the lowest last step, then the oldest heartbeat. A rank blocked in a collective
    completed the same steps as the hung one, or more, and sleeps."""
    return sorted(beats, key=Beat.suspicion)


class BlamedBy(enum.StrEnum):
    """What singled out the blamed rank among the stalled ones (how sure the evidence is)."""

    ALONE = "alone"  # no other rank was stalled
    PROCESS_STATE = "process_state"  # it cannot be stepping, the others may be waiting
    LAST_STEP = "last_step"  # it completed fewer steps
    # the same steps, the same state: only its heartbeat was older (a guess: a rank that hangs
    # between steps looks like its peers waiting for it)
    OLDEST_HEARTBEAT = "oldest_heartbeat"


def blamed_by(stalled: Sequence[Beat]) -> BlamedBy:
    """Why ``stalled[0]`` (in `blame` order) comes first."""
    if len(stalled) < 2:
        return BlamedBy.ALONE
    first, second = stalled[0].suspicion(), stalled[1].suspicion()
    if first[0] != second[0]:
        return BlamedBy.PROCESS_STATE
    if first[1] != second[1]:
        return BlamedBy.LAST_STEP
    return BlamedBy.OLDEST_HEARTBEAT


def hang_evidence(stalled: Sequence[Beat], recovery: Recovery) -> dict[str, Any]:
    """A hang's evidence from the stalled ranks in `blame` order: the blamed rank's record
    and timeout, what singled it out, then every stalled rank's record."""
    victim = stalled[0]
    evidence: dict[str, Any] = victim.to_wire()
    if victim.last_step is None:
        evidence["startup_timeout_s"] = recovery.startup_timeout
    else:
        evidence["heartbeat_timeout_s"] = recovery.heartbeat_timeout
    evidence["blamed_by"] = blamed_by(stalled).value
    evidence["stalled"] = [b.to_wire() for b in stalled]
    return evidence


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
    pace: StepPace
    startup_timeout: float
    last_beat: float | None = None  # trio clock
    last_beat_wall: float | None = None
    last_step: int | None = None
    reported: bool = False
    cpu_mark: tuple[float, float | None] | None = None  # (trio clock, CPU seconds) ahead of
    # the step history's verdict, to tell a busy process from a stuck one
    hold_until: float = -math.inf  # no verdict by the step history before (a quiet peer)

    def limit(self) -> float:
        """The silence since the last heartbeat (the spawn before the first) that is a hang."""
        limit = self.pace.limit()
        return self.startup_timeout if limit is None else limit

    def deadline(self) -> float:
        """When this rank is hung if it stays silent (trio clock)."""
        return (self.spawned if self.last_beat is None else self.last_beat) + self.limit()

    def next_look(self) -> float:
        """When the watch loop must look at this rank again (trio clock): its deadline; with
        the step history's verdict, first to read its CPU time, then not before a window."""
        deadline = self.deadline()
        if not self.pace.by_history:
            return deadline
        if self.cpu_mark is None:
            return deadline - min(BUSY_WINDOW_S, 0.5 * self.limit())
        return max(deadline, self.cpu_mark[0] + MIN_BUSY_WINDOW_S, self.hold_until)

    def beat(self, rank: int, now: float) -> Beat:
        """This rank's record now (``now``: the trio clock), with its process's state."""
        last = self.spawned if self.last_beat is None else self.last_beat
        wall = self.spawned_wall if self.last_beat_wall is None else self.last_beat_wall
        state = proc_state(self.pid)
        return Beat(rank, self.pid, self.last_step, wall, now - last, state, self.limit())


class Monitor:
    """Deadlines for the running workers' heartbeats, and the metrics they carry."""

    def __init__(
        self,
        policy: Policy,
        report: Callable[[Detection], None],
        *,
        cpu: Callable[[int], float | None] = cpu_seconds,
        peers_quiet_for: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._policy = policy
        self._report = report
        self._cpu = cpu  # a process's CPU seconds so far (None: unknown)
        self._peers_quiet_for = peers_quiet_for  # the longest silence of a live peer node
        self._quiet_peer_s = QUIET_PEER_BEATS * policy.cluster.heartbeat_interval
        self._watches: dict[int, _Watch] = {}
        # rank -> (last step, trio time of its beat): kept across a worker's exit, so a
        # status during a recovery still says where each rank stopped.
        self._last: dict[int, tuple[int, float]] = {}
        self._wakeup = trio.Event()
        self._wake_at = math.inf  # when the watch loop wakes up next (trio clock)
        self._nan_warned = False
        self._rule = HangRule.from_policy(policy)

    # -- what the executor and the arena service tell us ----------------------------------

    def arm(self, rank: int, pid: int) -> None:
        """A worker for ``rank`` was spawned: its startup deadline starts now."""
        startup = self._policy.recovery.startup_timeout
        now = trio.current_time()
        self._watches[rank] = _Watch(pid, now, time.time(), StepPace(self._rule), startup)
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
        watch.last_beat = now = trio.current_time()
        watch.last_beat_wall = time.time()
        watch.last_step = step
        watch.pace.beat(now)
        watch.cpu_mark = None
        self._last[rank] = (step, now)
        self._rewake(watch)
        get_telemetry().metrics.training_steps.add(1)
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad and not watch.reported:
            self._non_finite(rank, step, bad, watch)

    def pause(self, rank: int, paused: bool) -> None:
        """The worker of ``rank`` says that a long phase starts (``paused``) or ended
        (`Snapshotter.pause`): meanwhile only the heartbeat timeout applies to it."""
        watch = self._watches.get(rank)
        if watch is None or watch.pace.paused == paused:
            return
        now = trio.current_time()
        if paused:
            watch.pace.pause(now)
        else:
            watch.pace.resume(now)
        watch.cpu_mark = None
        log.info("pause started" if paused else "pause ended", rank=rank, step=watch.last_step)
        self._rewake(watch)

    def _rewake(self, watch: _Watch) -> None:
        """The watch loop recomputes its deadlines now when ``watch``'s came earlier than
        the loop's wake-up (the first heartbeat, a history long enough to judge, a resume)."""
        if watch.next_look() < self._wake_at:
            self._wakeup.set()

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

    def beats(self) -> list[Beat]:
        """Every watched rank's heartbeat record now (the coordinator judges hangs by them)."""
        now = trio.current_time()
        return [w.beat(r, now) for r, w in sorted(self._watches.items())]

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

    def _look(self, rank: int, w: _Watch, now: float) -> None:
        """Judge ``rank`` now: hung past its limit, unless the step history's verdict finds
        its process busy, or a peer node silent (a node loss in the making stalls the ranks
        here too): then the timeout rules until its next heartbeat."""
        if not w.pace.by_history:
            if now >= w.deadline():
                self._hang(rank, w, now)
            return
        if w.cpu_mark is None:
            if now >= w.next_look():
                w.cpu_mark = (now, self._cpu(w.pid))
            return
        if now < w.next_look():
            return
        since, before = w.cpu_mark
        after = self._cpu(w.pid)
        w.cpu_mark = None
        if before is not None and after is not None:
            used = after - before
            if used >= BUSY_CPU_FRACTION * (now - since):
                w.pace.suspend()
                log.info(
                    "silent past its step history but busy: judged by the timeout",
                    rank=rank,
                    pid=w.pid,
                    last_step=w.last_step,
                    silent_for_s=round(now - (w.last_beat or w.spawned), 3),
                    cpu_s=round(used, 3),
                    window_s=round(now - since, 3),
                )
                return
        quiet = self._peers_quiet_for()
        if quiet >= self._quiet_peer_s:
            w.cpu_mark = (now, after)
            w.hold_until = now + self._policy.cluster.heartbeat_interval
            log.debug(
                "silent past its step history while a peer node is silent: waiting",
                rank=rank,
                last_step=w.last_step,
                peer_silent_for_s=round(quiet, 3),
            )
            return
        self._hang(rank, w, now)

    def _hang(self, rank: int, w: _Watch, now: float) -> None:
        """``rank``'s deadline passed: judge every rank stalled with it, report the first."""
        recovery = self._policy.recovery
        stalled = [w.beat(rank, now)]
        for other, ow in self._watches.items():
            if other != rank and not ow.reported:
                b = ow.beat(other, now)
                if b.stalled(recovery):
                    stalled.append(b)
        stalled = blame(stalled)
        victim = stalled[0]
        for b in stalled:
            self._watches[b.rank].reported = True
        evidence = hang_evidence(stalled, recovery)
        # This node sees its own ranks only: a silent rank here may be waiting for a hung one
        # elsewhere. The coordinator judges across nodes and logs "worker hung".
        log.warning("heartbeat timeout", **evidence)
        self._report(Detection(Trigger.HEARTBEAT_TIMEOUT, victim.last_beat, time.time(), evidence))

    async def run(
        self, *, task_status: trio.TaskStatus[Monitor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Watch the deadlines until cancelled."""
        task_status.started(self)
        while True:
            now = trio.current_time()
            pending = [(r, w) for r, w in self._watches.items() if not w.reported]
            for rank, w in pending:
                # not w.reported: an earlier hang this round may have reported it stalled
                if not w.reported:
                    self._look(rank, w, now)
            upcoming = [w.next_look() for w in self._watches.values() if not w.reported]
            self._wakeup = trio.Event()
            self._wake_at = min(upcoming, default=math.inf)
            with trio.move_on_at(self._wake_at):
                await self._wakeup.wait()
