"""When a worker's silence is a hang: judged from its own step-interval history, not only a
fixed timeout (sans-IO: every time is the caller's clock).

The idea is the phi-accrual failure detector of Hayashibara et al. (as in Akka and Cassandra,
and `supervise.cluster.failure_detector` for peers), applied to training steps: once a rank
has a history of ``MIN_SAMPLES`` step intervals, its silence is a hang when it is both
improbable given that history (phi = -log10 P(a step takes longer) reaches
``recovery.hang_phi``, intervals modelled as a normal distribution) and longer than a
minimum: ``recovery.hang_min_steps`` typical (median) intervals and ``recovery.hang_min_silence``
seconds, so a loaded machine's jitter is no hang. ``recovery.heartbeat_timeout`` stays the
upper bound, and is the only rule before the history exists and while the training script
says that a long phase runs (``Snapshotter.pause``); the interval that spans a pause is kept
out of the history.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from typing import Final

import attrs

from supervise.policy import Policy

#: Step intervals a rank needs before its history is trusted; until then the timeout rules.
MIN_SAMPLES: Final = 5
#: Step intervals kept per rank (the newest): the detector follows a pace that changes.
WINDOW: Final = 64
#: The least standard deviation, as a fraction of the mean: a perfectly regular history does
#: not make a slightly late step certain to be a hang.
MIN_STD_FRACTION: Final = 0.1

#: A peer node silent this many of its heartbeat intervals may be lost: a step history's
#: verdict waits while the membership decides (peer_lost: the ranks here stall waiting for
#: the lost ones, they did not hang); so no verdict comes before one more interval than that.
QUIET_PEER_BEATS: Final = 2

_NORMAL: Final = statistics.NormalDist()


class History:
    """The newest `WINDOW` step intervals, with their mean, deviation and median in O(1) per
    interval (running sums, a sorted copy): the agent judges every heartbeat of every rank."""

    __slots__ = ("_added", "_sorted", "_sum", "_sumsq", "_values")

    def __init__(self) -> None:
        self._values: deque[float] = deque()
        self._sorted: list[float] = []
        self._sum = 0.0
        self._sumsq = 0.0
        self._added = 0

    def __len__(self) -> int:
        return len(self._values)

    def add(self, interval: float) -> None:
        """Record one interval (the oldest goes when the window is full)."""
        self._values.append(interval)
        bisect.insort(self._sorted, interval)
        self._sum += interval
        self._sumsq += interval * interval
        if len(self._values) > WINDOW:
            old = self._values.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            self._sum -= old
            self._sumsq -= old * old
        self._added += 1
        if self._added % WINDOW == 0:  # the running sums, exact again (no drift in long runs)
            self._sum = math.fsum(self._values)
            self._sumsq = math.fsum(x * x for x in self._values)

    def mean(self) -> float:
        return self._sum / len(self._values)

    def std(self) -> float:
        """The population standard deviation."""
        mean = self.mean()
        return math.sqrt(max(0.0, self._sumsq / len(self._values) - mean * mean))

    def median(self) -> float:
        s, n = self._sorted, len(self._sorted)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


@attrs.frozen(slots=True)
class HangRule:
    """The policy's hang rule: adaptive or timeout only, and the adaptive rule's bounds."""

    adaptive: bool
    timeout: float
    phi: float
    min_steps: float
    min_silence: float
    # phi(t) = -log10 P(X > t) for X ~ N(mean, std) reaches `phi` at t = mean + z * std
    z: float = attrs.field(init=False)

    @z.default
    def _z(self) -> float:
        return -_NORMAL.inv_cdf(10.0**-self.phi)

    @classmethod
    def from_policy(cls, policy: Policy) -> HangRule:
        """The rule a policy sets: its ``recovery.hang_*`` keys; the least silence is also
        more than a quiet peer's (`QUIET_PEER_BEATS` cluster heartbeat intervals)."""
        r = policy.recovery
        quiet = (QUIET_PEER_BEATS + 1) * policy.cluster.heartbeat_interval
        return cls(
            r.hang_detection == "adaptive",
            r.heartbeat_timeout,
            r.hang_phi,
            r.hang_min_steps,
            max(r.hang_min_silence, quiet),
        )

    def bound(self, history: History) -> float | None:
        """The silence that makes a rank with this step history hung (None: too few
        intervals to judge by, the timeout rules): at most the timeout, at least the two
        minimums."""
        if not self.adaptive or len(history) < MIN_SAMPLES:
            return None
        mean = history.mean()
        improbable = mean + self.z * max(history.std(), MIN_STD_FRACTION * mean)
        typical = history.median()
        return min(self.timeout, max(self.min_silence, self.min_steps * typical, improbable))


class StepPace:
    """One worker's heartbeats and pauses: the silence since its last heartbeat that makes
    it hung (`limit`). Before its first heartbeat the caller's startup rule applies."""

    __slots__ = (
        "_bound",
        "_intervals",
        "_last",
        "_paused_at",
        "_resumed_at",
        "_rule",
        "_skip",
        "_suspended",
    )

    def __init__(self, rule: HangRule) -> None:
        self._rule = rule
        self._intervals = History()
        self._bound: float | None = None  # the adaptive bound of the current history
        self._last: float | None = None  # the last heartbeat
        self._paused_at: float | None = None  # a long phase runs since then
        self._resumed_at: float | None = None  # the last pause ended then (no beat since)
        self._skip = False  # the next interval spans a pause: not a step's time
        self._suspended = False  # busy, not hung: the timeout until the next heartbeat

    @property
    def paused(self) -> bool:
        """Whether the training script said that a long phase runs now."""
        return self._paused_at is not None

    @property
    def by_history(self) -> bool:
        """Whether `limit` is the step history's verdict now (else the timeout's)."""
        return not (self._suspended or self.paused or self._bound is None or self._last is None)

    @property
    def samples(self) -> int:
        """How many step intervals the history holds."""
        return len(self._intervals)

    def beat(self, now: float) -> None:
        """A step completed at ``now``."""
        if self._last is not None and not self._skip:
            self._intervals.add(now - self._last)
            self._bound = self._rule.bound(self._intervals)
        self._skip = self.paused
        self._last = now
        self._resumed_at = None
        self._suspended = False

    def suspend(self) -> None:
        """Its silence passed the history's limit but the process was busy (computing, not
        stuck): only the timeout applies until its next heartbeat, and the interval up to it,
        a long phase nobody announced, stays out of the history."""
        self._suspended = self._skip = True

    def pause(self, now: float) -> None:
        """A long phase starts at ``now`` (a second call while paused changes nothing)."""
        if self._paused_at is None:
            self._paused_at = now
            self._skip = True

    def resume(self, now: float) -> None:
        """The long phase ended at ``now``."""
        if self._paused_at is not None:
            self._paused_at = None
            self._resumed_at = now

    def limit(self) -> float | None:
        """The silence since the last heartbeat that makes this rank hung (None: no heartbeat
        yet). Paused: the timeout from the pause's start; just resumed: the usual bound from
        the resume; else the adaptive bound, or the timeout while the history is short."""
        if self._last is None:
            return None
        anchor = self._last
        bound = self._rule.timeout if self._bound is None or self._suspended else self._bound
        if self._paused_at is not None:
            anchor, bound = max(anchor, self._paused_at), self._rule.timeout
        elif self._resumed_at is not None:
            anchor = max(anchor, self._resumed_at)
        return anchor - self._last + bound
