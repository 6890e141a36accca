"""The scheduler, property-tested: it never over-commits a node, every placement passes the
filters (labels, avoid, room), priorities are honoured (no lower-priority task takes room a
higher one fits in), a replica holder is preferred, and the same input gives the same output."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervise._validation import InvalidValue
from supervise.tasks.resources import Resources
from supervise.tasks.scheduler import (
    NodeView,
    Placement,
    PlaceReason,
    Request,
    Strategy,
    order,
    place,
    unschedulable,
)

LABELS = ("zone=a", "zone=b", "gpu=a100")
GiB = 1 << 30

resources = st.builds(
    Resources,
    cpu=st.integers(0, 16).map(lambda m: m / 4),
    memory=st.integers(0, 8).map(lambda g: g * GiB),
    gpus=st.integers(0, 2),
)


@st.composite
def nodes(draw: st.DrawFn) -> list[NodeView]:
    ranks = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True))
    out = []
    for rank in ranks:
        capacity = draw(resources)
        used = draw(resources)
        labels = draw(st.frozensets(st.sampled_from(LABELS)))
        running = draw(st.integers(0, 4))
        out.append(NodeView(rank, capacity, used, labels, running))
    return out


@st.composite
def requests(draw: st.DrawFn) -> list[Request]:
    n = draw(st.integers(0, 12))
    return [
        Request(
            f"t{i}",
            draw(resources),
            draw(st.frozensets(st.sampled_from(LABELS), max_size=1)),
            priority=draw(st.integers(-1, 2)),
            seq=draw(st.integers(0, 5)),
            replica_on=draw(st.frozensets(st.integers(0, 9), max_size=2)),
            avoid=draw(st.frozensets(st.integers(0, 9), max_size=2)),
        )
        for i in range(n)
    ]


def _fits_on(req: Request, node: NodeView, free: Resources) -> bool:
    return node.rank not in req.avoid and req.labels <= node.labels and req.needs.fits_in(free)


@settings(max_examples=100, deadline=None)
@given(requests(), nodes(), st.sampled_from(Strategy))
def test_placements_satisfy_filters_and_never_overcommit(
    reqs: list[Request], ns: list[NodeView], strategy: Strategy
) -> None:
    placed = place(reqs, ns, strategy)
    assert place(list(reversed(reqs)), list(reversed(ns)), strategy) == placed  # deterministic
    by_id = {r.task_id: r for r in reqs}
    by_rank = {n.rank: n for n in ns}
    assert len({p.task_id for p in placed}) == len(placed)
    added: dict[int, Resources] = defaultdict(lambda: Resources(0))
    for p in placed:
        req, node = by_id[p.task_id], by_rank[p.rank]
        assert p.rank not in req.avoid
        assert req.labels <= node.labels
        added[p.rank] = added[p.rank] + req.needs
        if p.why is PlaceReason.REPLICA:
            assert p.rank in req.replica_on
        else:
            assert p.why.value == strategy.value
    for rank, total in added.items():
        node = by_rank[rank]
        # exact (millicores): what was placed fits in what was free before the round
        assert total.fits_in(node.capacity - node.used)


@settings(max_examples=100, deadline=None)
@given(requests(), nodes(), st.sampled_from(Strategy))
def test_priorities_and_replicas_are_respected(
    reqs: list[Request], ns: list[NodeView], strategy: Strategy
) -> None:
    """Replaying the placements in the scheduler's order: a request left pending fitted
    nowhere when its turn came (so nothing after it took its room), and a request placed
    off its replica holders found none of them with room."""
    placed = {p.task_id: p for p in place(reqs, ns, strategy)}
    free = {n.rank: n.free for n in ns}
    by_rank = {n.rank: n for n in ns}
    seen_order = order(reqs)
    assert [p for p in (placed.get(r.task_id) for r in seen_order) if p] == place(
        reqs, ns, strategy
    )
    for req in seen_order:
        fitting = [n for n in ns if _fits_on(req, n, free[n.rank])]
        p = placed.get(req.task_id)
        if p is None:
            assert not fitting, f"{req.task_id} left pending though it fitted"
            continue
        holders = [n.rank for n in fitting if n.rank in req.replica_on]
        if holders:
            assert p.rank in holders and p.why is PlaceReason.REPLICA
        free[p.rank] = free[p.rank] - req.needs
        assert by_rank[p.rank] in fitting


def _node(rank: int, cpu: float = 4, memory: int = 8 * GiB, **kw: object) -> NodeView:
    return NodeView(rank, Resources(cpu, memory), Resources(0), **kw)  # type: ignore[arg-type]


def test_pack_fills_one_node_spread_uses_all() -> None:
    ns = [_node(0), _node(1), _node(2)]
    reqs = [Request(f"t{i}", Resources(1), seq=i) for i in range(3)]
    assert [p.rank for p in place(reqs, ns, Strategy.PACK)] == [0, 0, 0]
    assert [p.rank for p in place(reqs, ns, Strategy.SPREAD)] == [0, 1, 2]
    # spread: the node running fewest goes first
    busy = [NodeView(0, Resources(4), Resources(0), running=2), _node(1)]
    assert place([Request("t", Resources(1))], busy, Strategy.SPREAD)[0].rank == 1


def test_pack_prefers_the_fullest_node_that_fits() -> None:
    ns = [
        _node(0),
        NodeView(1, Resources(4), Resources(3)),
        NodeView(2, Resources(4), Resources(2)),
    ]
    assert place([Request("t", Resources(1))], ns)[0].rank == 1
    assert place([Request("t", Resources(2))], ns)[0].rank == 2


def test_replica_holder_wins_over_the_strategy_and_avoid_wins_over_the_replica() -> None:
    ns = [_node(0), _node(1), _node(2)]
    r = Request("t", Resources(1), replica_on=frozenset({2}))
    assert place([r], ns) == [Placement("t", 2, PlaceReason.REPLICA)]
    r = Request("t", Resources(1), replica_on=frozenset({2}), avoid=frozenset({2, 0}))
    assert place([r], ns) == [Placement("t", 1, PlaceReason.PACK)]


def test_higher_priority_first_then_fifo_and_smaller_work_backfills() -> None:
    ns = [_node(0, cpu=2)]
    reqs = [
        Request("low", Resources(1), priority=0, seq=0),
        Request("big", Resources(4), priority=5, seq=1),  # never fits now: stays pending
        Request("high", Resources(1), priority=1, seq=3),
        Request("high-earlier", Resources(1), priority=1, seq=2),
    ]
    assert [p.task_id for p in place(reqs, ns)] == ["high-earlier", "high"]
    reqs[2] = Request("high", Resources(2), priority=1, seq=3)
    assert [p.task_id for p in place(reqs, ns)] == ["high-earlier", "low"]  # backfill


def test_labels_filter() -> None:
    ns = [_node(0, labels=frozenset({"zone=a"})), _node(1, labels=frozenset({"zone=b"}))]
    r = Request("t", Resources(1), labels=frozenset({"zone=b"}))
    assert place([r], ns)[0].rank == 1
    r = Request("t", Resources(1), labels=frozenset({"zone=c"}))
    assert place([r], ns) == []


def test_unschedulable_says_why_in_one_line() -> None:
    ns = [_node(0, cpu=8), _node(1, cpu=4, labels=frozenset({"gpu=a100"}))]
    assert unschedulable(Resources(8), frozenset(), ns) is None
    assert unschedulable(Resources(64), frozenset(), ns) == "needs 64 cpu; the largest node has 8"
    assert unschedulable(Resources(1, 64 * GiB), frozenset(), ns) == (
        "needs 64GiB memory; the largest node has 8GiB"
    )
    assert unschedulable(Resources(1, gpus=1), frozenset(), ns) == (
        "needs 1 gpus; the largest node has 0"
    )
    assert unschedulable(Resources(6), frozenset({"gpu=a100"}), ns) == (
        "needs 6 cpu; the largest node with labels gpu=a100 has 4"
    )
    assert unschedulable(Resources(1), frozenset({"zone=x"}), ns) == (
        "needs labels zone=x; no node has them all"
    )
    mixed = [
        NodeView(0, Resources(8, GiB), Resources(0)),
        NodeView(1, Resources(1, 8 * GiB), Resources(0)),
    ]
    why = unschedulable(Resources(4, 4 * GiB), frozenset(), mixed)
    assert why is not None and "no node has them all" in why and "\n" not in why
    assert unschedulable(Resources(1), frozenset(), []) is not None
    # what a node runs now does not matter: only whether it could ever
    full = [NodeView(0, Resources(2), Resources(2))]
    assert unschedulable(Resources(2), frozenset(), full) is None


def test_bad_views_are_refused_in_one_line() -> None:
    with pytest.raises(InvalidValue, match="distinct"):
        place([], [_node(0), _node(0)])
    with pytest.raises(InvalidValue, match="distinct"):
        place([Request("t", Resources(1)), Request("t", Resources(1))], [_node(0)])
    with pytest.raises(InvalidValue, match="label"):
        Request("t", Resources(1), labels=frozenset({"nolabel"}))
    with pytest.raises(InvalidValue, match="rank"):
        Request("t", Resources(1), avoid=frozenset({-1}))
