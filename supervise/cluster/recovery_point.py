"""The cluster's recoverable point: one version every holder of every rank keeps, sans-IO.

Each rank's owner keeps a few newest versions and each group peer the newest replica it got;
with snapshots every step and replicas trailing by a step or more, those sets need not share
a version, and a lost node then leaves nothing to restore. So the nodes agree, through their
heartbeats, on one version to keep everywhere:

- the *leader* (the lowest live node) names a *target* ``(generation, step)`` a little ahead
  of the newest step (far enough that every node hears of it before committing it);
- every node *pins* the target as its ranks commit it (local retention keeps it), pushes it
  to its group peers before anything newer, and keeps the replicas of it it receives (the
  replica store protects it); it reports ``have`` once all of that holds, ``missed`` when
  its ranks went past the target without it;
- when every node reports ``have``, the target becomes the *point* and the leader names the
  next target; a node unpins its old point only once it adopted the new one. A missed target
  gets a new one further ahead, a round that stalls once training passed its target a new one.

The point only moves to a version every holder held and pinned, and a pin goes only after a
newer point replaced it, so at any moment some version is complete across the cluster (for
every rank: its owner's arena and every group peer's replicas). A node that just took over
the lead (knowing no target, or an older point) is not followed until it caught up, and the
agent lets no pin go while a recovery runs (`supervise.agents.keeper`), so the version a
recovery selected stays where it was found. Retention needs two slots more per arena and two
replicas more per rank in the replica store (the point and the target).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import structlog

log = structlog.get_logger("supervise.cluster.recovery_point")

#: A version across ranks: ``(generation, step)``.
Mark = tuple[int, int]

#: The heartbeat info key that carries a node's `Report`.
INFO_KEY = "rp"

_MAX_MISSES = 3  # a missed target doubles the lead of the next one, up to 2**3 times

#: Extra slots per arena (and replicas per rank) the point and the target take.
PINNED_VERSIONS = 2


def _mark(raw: Any) -> Mark | None:
    if (
        isinstance(raw, (list, tuple))
        and len(raw) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
    ):
        return (int(raw[0]), int(raw[1]))
    return None


@attrs.frozen(slots=True)
class Report:
    """What a node says of the recoverable point in its heartbeat info."""

    point: Mark | None = None
    target: Mark | None = None
    have: bool = False  # holds the target: its ranks' arenas and the replicas it keeps
    missed: bool = False  # its ranks went past the target without capturing it
    newest: Mark | None = None  # the oldest of its ranks' newest versions

    def to_wire(self) -> list[Any]:
        return [
            list(self.point) if self.point else None,
            list(self.target) if self.target else None,
            self.have,
            self.missed,
            list(self.newest) if self.newest else None,
        ]

    @classmethod
    def from_wire(cls, raw: Any) -> Report | None:
        """A report from heartbeat info; None when absent or malformed (an older agent)."""
        if not isinstance(raw, (list, tuple)) or len(raw) != 5:
            return None
        point, target, have, missed, newest = raw
        return cls(_mark(point), _mark(target), have is True, missed is True, _mark(newest))


class RecoveryPoint:
    """One node's view: the point and target it keeps, and, while it leads, the rounds."""

    def __init__(
        self,
        node: int,
        nodes: Sequence[int],
        *,
        interval: float,
        stride: int = 1,
        spacing: float = 0.0,
        round_timeout: float | None = None,
    ) -> None:
        """``interval``: the heartbeat interval; ``stride``: the capture stride in steps;
        ``spacing``: seconds of training at least between targets (`Replication.every_seconds`:
        the nodes push the targets and little else)."""
        if interval <= 0 or stride < 1 or spacing < 0:
            raise ValueError(
                f"interval {interval} must be > 0, stride {stride} >= 1, spacing {spacing} >= 0"
            )
        self.node = node
        self.nodes = sorted(nodes)
        self.interval = interval
        self.stride = stride
        self.spacing = spacing
        # how long a round may last once the training reached its target
        self.round_timeout = round_timeout if round_timeout is not None else 10 * interval
        self.point: Mark | None = None
        self.target: Mark | None = None
        self.rounds = 0  # points established while this node led
        self._reached: float | None = None  # when the newest step reached the target
        self._misses = 0
        self._seen: tuple[float, int] | None = None  # (time, newest step) last seen leading
        self._rate = 0.0  # steps per second, smoothed

    # -- every node ------------------------------------------------------------------------

    @property
    def protected(self) -> frozenset[Mark]:
        """The versions to keep (and push first): the point and the target."""
        return frozenset(m for m in (self.point, self.target) if m is not None)

    def report(self, *, have: bool, missed: bool, newest: Mark | None) -> Report:
        return Report(self.point, self.target, have, missed, newest)

    def follow(self, leader: Report | None) -> None:
        """Adopt the leader's target, and its point when it is newer than ours. A leader that
        knows less than we do (a node that just took over: no target yet, an older point) is
        not followed until it caught up, or the target it drops could be the one a recovery
        is restoring."""
        if leader is None or leader.target is None:
            return
        if self.point is not None and (leader.point is None or leader.point < self.point):
            return
        self.point = leader.point
        self.target = leader.target

    # -- the leader ------------------------------------------------------------------------

    def lead(self, reports: Mapping[int, Report | None], now: float) -> None:
        """Advance the rounds from every node's latest report (this node's included)."""
        heard = [r for r in reports.values() if r is not None]
        for r in heard:  # a new leader carries on from the newest point anyone adopted
            if r.point is not None and (self.point is None or r.point > self.point):
                self.point = r.point
        newest = max((r.newest for r in heard if r.newest is not None), default=None)
        if newest is None:
            return
        self._observe(newest[1], now)
        target = self.target
        if target is None or target[0] < newest[0] or (self.point and target <= self.point):
            self._misses = 0  # a new generation: the steps start over from a restore
            self._next(newest, now)
            return
        if self._reached is None and newest[1] >= target[1]:
            self._reached = now
        everyone = [reports.get(n) for n in self.nodes]
        if all(r is not None and r.target == target and r.have for r in everyone):
            self.point = target
            self.rounds += 1
            self._misses = 0
            log.debug("recoverable point", generation=target[0], step=target[1])
            self._next(newest, now)
        elif any(r.target == target and r.missed for r in heard):
            self._misses = min(self._misses + 1, _MAX_MISSES)  # it came too soon: further
            self._next(newest, now)
        elif self._reached is not None and now - self._reached >= self.round_timeout:
            log.info("recoverable point round timed out", target=target[1])
            self._next(newest, now)

    def _observe(self, step: int, now: float) -> None:
        if self._seen is not None and now > self._seen[0] and step >= self._seen[1]:
            rate = (step - self._seen[1]) / (now - self._seen[0])
            self._rate = rate if self._rate == 0 else 0.5 * self._rate + 0.5 * rate
        self._seen = (now, step)

    def _next(self, newest: Mark, now: float) -> None:
        """The next target: ahead of the newest step by what the nodes do in two heartbeats
        (doubled per miss in a row, up to 8 times) or in ``spacing``, on the capture stride."""
        ahead = self._rate * max(self.interval * 2 * (2**self._misses), self.spacing)
        step = newest[1] + max(self.stride, math.ceil(ahead))
        step = -(-step // self.stride) * self.stride
        self.target = (newest[0], step)
        self._reached = None
