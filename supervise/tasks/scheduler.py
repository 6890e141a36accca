"""Placement of pending tasks on farm nodes: filter by resources and labels, then score.

STAND-IN written on branch `farm` with the FARM_API.md signatures; the `sched` engineer owns
this module and the lead keeps their version at merge.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

from supervise.tasks.resources import Resources


class Strategy(enum.StrEnum):
    PACK = "pack"
    SPREAD = "spread"


class PlaceReason(enum.StrEnum):
    REPLICA = "replica"
    PACK = "pack"
    SPREAD = "spread"


@attrs.frozen(slots=True)
class NodeView:
    rank: int
    capacity: Resources
    used: Resources
    labels: frozenset[str] = frozenset()
    running: int = 0


@attrs.frozen(slots=True)
class Request:
    task_id: str
    needs: Resources
    labels: frozenset[str] = frozenset()
    priority: int = 0
    seq: int = 0
    replica_on: frozenset[int] = frozenset()
    avoid: frozenset[int] = frozenset()


@attrs.frozen(slots=True)
class Placement:
    task_id: str
    rank: int
    why: PlaceReason


def place(
    requests: Sequence[Request], nodes: Sequence[NodeView], strategy: Strategy = Strategy.PACK
) -> list[Placement]:
    """Placements for the requests that fit now, highest priority first, FIFO within."""
    used = {n.rank: n.used for n in nodes}
    running = {n.rank: n.running for n in nodes}
    out: list[Placement] = []
    for req in sorted(requests, key=lambda r: (-r.priority, r.seq)):
        fits = [
            n
            for n in nodes
            if n.rank not in req.avoid
            and req.labels <= n.labels
            and req.needs.fits_in(n.capacity - used[n.rank])
        ]
        if not fits:
            continue
        rep = [n for n in fits if n.rank in req.replica_on]
        if rep:
            best, why = rep[0], PlaceReason.REPLICA
        elif strategy is Strategy.SPREAD:
            best, why = min(fits, key=lambda n: (running[n.rank], n.rank)), PlaceReason.SPREAD
        else:
            best = min(fits, key=lambda n: ((n.capacity - used[n.rank]).cpu, n.rank))
            why = PlaceReason.PACK
        used[best.rank] = used[best.rank] + req.needs
        running[best.rank] += 1
        out.append(Placement(req.task_id, best.rank, why))
    return out


def unschedulable(
    needs: Resources, labels: frozenset[str], nodes: Sequence[NodeView]
) -> str | None:
    """None when some node could ever run it, else a one-line reason."""
    if not nodes:
        return None
    labelled = [n for n in nodes if labels <= n.labels]
    if not labelled:
        return f"needs labels {', '.join(sorted(labels))}; no node has them all"
    if any(needs.fits_in(n.capacity) for n in labelled):
        return None
    return (
        f"needs {needs.cpu:g} cpu, {needs.memory} bytes, {needs.gpus} gpus; "
        f"the largest node has {max(n.capacity.cpu for n in labelled):g} cpu"
    )
