"""Sans-IO failure detector: heartbeat arrivals in, peer_lost / peer_back events out.

A peer is *lost* after ``timeout`` seconds without a heartbeat. With ``phi_threshold`` set it
is suspected earlier when its silence is improbable given its own heartbeat history (the
phi-accrual detector of Hayashibara et al., as in Akka and Cassandra): phi = -log10 P(a
heartbeat arrives later than now), with inter-arrival times modelled as a normal distribution.
``timeout`` stays the hard bound either way. A heartbeat from a lost peer, or one carrying a new
incarnation (the peer process restarted and lost its RAM), reports *peer_back*. A peer lost
before it was ever heard comes back as ``restarted``: nothing shows it kept its RAM.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable

import attrs

from supervise._validation import InvalidValue, number


class LossCause(enum.StrEnum):
    """What declared a peer lost."""

    HEARTBEAT = "heartbeat"  # silent for too long
    LEASE = "lease"  # its lease in the coordination store ended (``--store``)
    REFUSED = "refused"  # its connection closed and its endpoint refuses connections


@attrs.frozen(slots=True)
class PeerLost:
    """A peer went silent: its RAM (and the replicas it held) must be considered gone."""

    rank: int
    silence: float  # seconds since its last heartbeat (or since we started watching)
    kind: str = "peer_lost"
    cause: LossCause = LossCause.HEARTBEAT


@attrs.frozen(slots=True)
class PeerBack:
    """A peer is heard from again; ``restarted`` when it is a new process (new incarnation),
    or may be one (lost before any heartbeat of it arrived: its RAM cannot be assumed)."""

    rank: int
    incarnation: int
    restarted: bool
    kind: str = "peer_back"


@attrs.frozen(slots=True)
class RootChanged:
    """The lowest live rank changed."""

    root: int
    previous: int
    kind: str = "root_changed"


Event = PeerLost | PeerBack | RootChanged


def _threshold(_inst: object, attr: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None:
        number(gt=0)(_inst, attr, value)


@attrs.frozen(slots=True)
class DetectorConfig:
    """How peers are watched: heartbeat period, hard timeout, optional phi threshold."""

    interval: float = attrs.field(default=1.0, validator=number(gt=0))
    timeout: float = attrs.field(default=10.0, validator=number(gt=0))
    phi_threshold: float | None = attrs.field(default=None, validator=_threshold)
    window: int = attrs.field(default=100, validator=number(ge=2, integer=True))
    min_samples: int = attrs.field(default=5, validator=number(ge=2, integer=True))

    def __attrs_post_init__(self) -> None:
        if self.timeout <= self.interval:
            raise InvalidValue(
                "peer_timeout", self.timeout, f"must be > heartbeat_interval ({self.interval:g})"
            )


class _Peer:
    __slots__ = ("alive", "incarnation", "intervals", "last", "seen")

    def __init__(self, now: float) -> None:
        self.last = now  # last heartbeat, or when watching started
        self.seen = False  # heard from at least once
        self.alive = True  # presumed alive until the first timeout
        self.incarnation: int | None = None
        self.intervals: deque[float] = deque()


class FailureDetector:
    """Tracks the peers of one node; all times are the caller's clock (trio.current_time())."""

    def __init__(self, config: DetectorConfig, peers: Iterable[int], now: float) -> None:
        self.config = config
        self._peers: dict[int, _Peer] = {r: _Peer(now) for r in peers}

    def watch(self, rank: int, now: float) -> None:
        """Start watching a new peer (presumed alive until its timeout)."""
        self._peers.setdefault(rank, _Peer(now))

    def forget(self, rank: int) -> None:
        self._peers.pop(rank, None)

    @property
    def peers(self) -> list[int]:
        return sorted(self._peers)

    def heard(self, rank: int) -> bool:
        """Whether ``rank`` was heard from at least once (its state is known)."""
        p = self._peers.get(rank)
        return p is not None and p.seen

    def is_alive(self, rank: int) -> bool:
        p = self._peers.get(rank)
        return p is not None and p.alive

    def live(self) -> list[int]:
        return sorted(r for r, p in self._peers.items() if p.alive)

    def incarnation(self, rank: int) -> int | None:
        p = self._peers.get(rank)
        return None if p is None else p.incarnation

    def heartbeat(self, rank: int, incarnation: int, now: float) -> list[Event]:
        """Record a heartbeat; returns peer_back when the peer was lost or restarted."""
        p = self._peers.get(rank)
        if p is None:
            return []
        events: list[Event] = []
        # lost before it was heard: which process that was is unknown, so its RAM is too
        restarted = not p.alive if p.incarnation is None else incarnation != p.incarnation
        if restarted:
            p.intervals.clear()  # a new process: its history says nothing about it
        elif p.seen and p.alive:
            p.intervals.append(now - p.last)
            if len(p.intervals) > self.config.window:
                p.intervals.popleft()
        if not p.alive or restarted:
            events.append(PeerBack(rank, incarnation, restarted))
        p.alive, p.seen, p.last, p.incarnation = True, True, now, incarnation
        return events

    def lose(self, rank: int, now: float, cause: LossCause) -> list[Event]:
        """Declare ``rank`` lost now (something other than its silence says so: ``cause``);
        a heartbeat brings it back as usual. Nothing when it is already lost."""
        p = self._peers.get(rank)
        if p is None or not p.alive:
            return []
        p.alive = False
        return [PeerLost(rank, max(0.0, now - p.last), cause=cause)]

    def excuse(self, seconds: float, now: float) -> None:
        """This process could not listen for ``seconds`` (it was stopped or starved): that
        time counts towards no peer's silence, since their heartbeats could not be taken in.
        A node frozen past ``timeout`` must not wake up to declare every peer lost (and then
        lead, alone, on a stale view); a peer that is really gone is lost one timeout later.
        A peer heard since (``last`` already past the pause) gets no more than ``now``."""
        for p in self._peers.values():
            p.last = min(p.last + seconds, now)

    def silence(self, rank: int, now: float) -> float:
        """Seconds since ``rank``'s last heartbeat (or since watching began; inf: unknown)."""
        p = self._peers.get(rank)
        return math.inf if p is None else max(0.0, now - p.last)

    def phi(self, rank: int, now: float) -> float:
        """Suspicion level of a peer: -log10 P(its next heartbeat is still to come at ``now``)."""
        p = self._peers.get(rank)
        if p is None:
            return math.inf
        elapsed = max(0.0, now - p.last)
        if len(p.intervals) < self.config.min_samples:
            mean, std = self.config.interval, self.config.interval / 4
        else:
            mean = sum(p.intervals) / len(p.intervals)
            var = sum((x - mean) ** 2 for x in p.intervals) / len(p.intervals)
            std = max(math.sqrt(var), self.config.interval / 10)
        later = 0.5 * math.erfc((elapsed - mean) / (std * math.sqrt(2)))
        return -math.log10(later) if later > 0 else math.inf

    def _limit(self, p: _Peer) -> float:
        """Silence that makes a peer lost: ``timeout``, doubled for a peer never heard from
        since watching began (a new process, or a connection still in zmq's reconnect
        backoff, must not be declared lost before it had a fair chance to be heard)."""
        return self.config.timeout if p.seen else 2 * self.config.timeout

    def _suspect(self, rank: int, p: _Peer, now: float) -> bool:
        silence = now - p.last
        if silence >= self._limit(p):
            return True
        th = self.config.phi_threshold
        return th is not None and p.seen and self.phi(rank, now) >= th

    def check(self, now: float) -> list[Event]:
        """Declare lost every live peer that has been silent too long."""
        events: list[Event] = []
        for rank in sorted(self._peers):
            p = self._peers[rank]
            if p.alive and self._suspect(rank, p, now):
                p.alive = False
                events.append(PeerLost(rank, now - p.last))
        return events

    def next_deadline(self, now: float) -> float:
        """The latest time the caller should call :meth:`check` again."""
        live = [p.last + self._limit(p) for p in self._peers.values() if p.alive]
        deadline = min(live, default=now + self.config.timeout)
        if self.config.phi_threshold is not None:
            deadline = min(deadline, now + self.config.interval / 2)
        return max(deadline, now)
