"""Where pending tasks go: filter the nodes a task fits on, then score them — pure and
deterministic (the same requests and nodes always give the same placements).

Filter: a node not in the request's ``avoid`` set, carrying every label the request asks for,
with ``capacity - used`` (minus what this round already placed there) covering the need.
Score: a node holding the task's journal replica first (it resumes from local RAM, no fetch);
then PACK (the node left with the least free after placing: keeps whole nodes free for big
tasks) or SPREAD (the node running the fewest tasks, then the most free: spreads the load and
the blast radius of a node loss); ties go to the lowest rank.

Requests are taken by priority (higher first), FIFO within a priority (``seq``), then task id.
A request that fits nowhere right now stays pending and the next ones are still tried, so
smaller, lower-priority work may *backfill* free room. The price: a large high-priority task
can wait while small ones keep taking the room it needs (no reservation); give it a label of
its own nodes or a higher share of the farm if that matters.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

import attrs

from supervise._validation import InvalidValue, instance_of, number
from supervise.tasks.resources import Resources, format_size

__all__ = ["NodeView", "PlaceReason", "Placement", "Request", "Strategy", "place", "unschedulable"]


class Strategy(enum.StrEnum):
    """How to choose among the nodes a task fits on."""

    PACK = "pack"  # the fullest node that still fits (least free after placing)
    SPREAD = "spread"  # the node running the fewest tasks, then the most free


class PlaceReason(enum.StrEnum):
    """Why a task went where it went."""

    REPLICA = "replica"  # the node holds the task's journal replica
    PACK = "pack"
    SPREAD = "spread"


def _ranks(value: Iterable[int]) -> frozenset[int]:
    ranks = frozenset(value)
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise InvalidValue("rank", r, "must be an integer >= 0")
    return ranks


def _labels(value: Iterable[str]) -> frozenset[str]:
    labels = frozenset(value)
    for label in labels:
        if not isinstance(label, str) or "=" not in label:
            raise InvalidValue("label", label, "must be a key=value string")
    return labels


@attrs.frozen(slots=True)
class NodeView:
    """What the scheduler knows of a farm node: its capacity, what its tasks use, its labels."""

    rank: int = attrs.field(validator=number(ge=0, integer=True))
    capacity: Resources = attrs.field(validator=instance_of(Resources))
    used: Resources = attrs.field(validator=instance_of(Resources))
    labels: frozenset[str] = attrs.field(default=frozenset(), converter=_labels)
    running: int = attrs.field(default=0, validator=number(ge=0, integer=True))

    @property
    def free(self) -> Resources:
        """Capacity minus use (never negative)."""
        return self.capacity - self.used


@attrs.frozen(slots=True)
class Request:
    """A pending task asking for a node."""

    task_id: str = attrs.field(validator=instance_of(str))
    needs: Resources = attrs.field(validator=instance_of(Resources))
    labels: frozenset[str] = attrs.field(default=frozenset(), converter=_labels)
    priority: int = attrs.field(default=0, validator=number(integer=True))
    seq: int = attrs.field(default=0, validator=number(integer=True))
    replica_on: frozenset[int] = attrs.field(default=frozenset(), converter=_ranks)
    avoid: frozenset[int] = attrs.field(default=frozenset(), converter=_ranks)


@attrs.frozen(slots=True)
class Placement:
    """A task placed on a node, and why there."""

    task_id: str
    rank: int
    why: PlaceReason


@attrs.define(slots=True)
class _Slot:
    """A node's room during one round of placements."""

    node: NodeView
    free: Resources
    running: int


def order(requests: Sequence[Request]) -> list[Request]:
    """The order requests are considered in: priority (higher first), seq, task id."""
    return sorted(requests, key=lambda r: (-r.priority, r.seq, r.task_id))


def _free_fraction(free: Resources, capacity: Resources) -> float:
    """How much of a node is free, 0..1, averaged over the dimensions it has at all."""
    parts = [
        f / c
        for f, c in (
            (free.millicpu, capacity.millicpu),
            (free.memory, capacity.memory),
            (free.gpus, capacity.gpus),
        )
        if c > 0
    ]
    return sum(parts) / len(parts) if parts else 0.0


def _key(slot: _Slot, needs: Resources, strategy: Strategy) -> tuple[float, ...]:
    after = _free_fraction(slot.free - needs, slot.node.capacity)
    if strategy is Strategy.PACK:
        return (after, slot.node.rank)
    return (slot.running, -after, slot.node.rank)


def place(
    requests: Sequence[Request], nodes: Sequence[NodeView], strategy: Strategy = Strategy.PACK
) -> list[Placement]:
    """Placements for the requests that fit now (in the order they were considered); the
    others stay pending. Never puts more on a node than its capacity minus its use."""
    strategy = Strategy(strategy)
    ranks = [n.rank for n in nodes]
    if len(set(ranks)) != len(ranks):
        raise InvalidValue("nodes", sorted(ranks), "ranks must be distinct")
    slots = [_Slot(n, n.free, n.running) for n in sorted(nodes, key=lambda n: n.rank)]
    placed: list[Placement] = []
    seen: set[str] = set()
    for req in order(requests):
        if req.task_id in seen:
            raise InvalidValue("requests", req.task_id, "task ids must be distinct")
        seen.add(req.task_id)
        fits = [
            s
            for s in slots
            if s.node.rank not in req.avoid
            and req.labels <= s.node.labels
            and req.needs.fits_in(s.free)
        ]
        if not fits:
            continue  # stays pending; later (smaller) requests may still fit: backfill
        holders = [s for s in fits if s.node.rank in req.replica_on]
        pool = holders or fits
        best = min(pool, key=lambda s: _key(s, req.needs, strategy))
        why = PlaceReason.REPLICA if holders else PlaceReason(strategy.value)
        best.free = best.free - req.needs
        best.running += 1
        placed.append(Placement(req.task_id, best.node.rank, why))
    return placed


def unschedulable(
    needs: Resources, labels: frozenset[str], nodes: Sequence[NodeView]
) -> str | None:
    """None when some node could ever run a task needing ``needs`` with ``labels`` (by its
    capacity, whatever it runs now); otherwise a one-line reason."""
    if not nodes:
        return "no farm node has offered its resources yet"
    wanted = frozenset(labels)
    eligible = [n for n in nodes if wanted <= n.labels]
    if not eligible:
        listed = ", ".join(sorted(wanted))
        return f"needs labels {listed}; no node has them all"
    if any(needs.fits_in(n.capacity) for n in eligible):
        return None
    where = "node" if not wanted else f"node with labels {', '.join(sorted(wanted))}"
    short = _short(needs, eligible)
    if short is not None:
        need, largest = short
        return f"needs {need}; the largest {where} has {largest}"
    biggest = max(eligible, key=lambda n: (n.capacity.millicpu, n.capacity.memory, n.rank))
    return f"needs {needs} on one node; no {where} has them all (largest: {biggest.capacity})"


def _short(needs: Resources, nodes: Sequence[NodeView]) -> tuple[str, str] | None:
    """The first dimension no node has enough of: (what is needed, the most any node has)."""
    if all(needs.millicpu > n.capacity.millicpu for n in nodes):
        return f"{needs.cpu:g} cpu", f"{max(n.capacity.cpu for n in nodes):g}"
    if all(needs.memory > n.capacity.memory for n in nodes):
        most = max(n.capacity.memory for n in nodes)
        return f"{format_size(needs.memory)} memory", format_size(most)
    if all(needs.gpus > n.capacity.gpus for n in nodes):
        return f"{needs.gpus} gpus", str(max(n.capacity.gpus for n in nodes))
    return None
