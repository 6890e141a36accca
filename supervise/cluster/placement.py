"""Which nodes hold whose snapshot (Gemini, SOSP'23), and how likely k failures are survivable.

``place(n, m, "group")``: nodes form groups of m consecutive ranks; each node holds the
snapshot of every member of its group. When m does not divide n the last group takes the
remainder (it has between m+1 and 2m-1 members) and places ring-wise inside it: each member on
itself and its m-1 successors in the group. ``place(n, m, "ring")``: each rank on itself and its
m-1 successors modulo n.

A set of failed nodes is recoverable from RAM when every failed rank still has a live holder.
:func:`recoverable_probability` computes, exactly, the chance that k simultaneous failures
(every k-subset equally likely) are recoverable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Literal

from supervise._validation import InvalidValue

Strategy = Literal["group", "ring"]
STRATEGIES: tuple[Strategy, ...] = ("group", "ring")
Placement = tuple[tuple[int, ...], ...]


def _check(n_nodes: int, replicas: int, strategy: str) -> None:
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise InvalidValue("n_nodes", n_nodes, "must be an integer >= 1")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidValue("replicas", replicas, "must be an integer >= 1")
    if replicas > n_nodes:
        raise InvalidValue("replicas", replicas, f"must be <= the number of nodes ({n_nodes})")
    if strategy not in STRATEGIES:
        raise InvalidValue("placement", strategy, "must be one of 'group', 'ring'")


def groups(n_nodes: int, replicas: int) -> tuple[tuple[int, ...], ...]:
    """The groups of "group" placement: m consecutive ranks; the last takes the remainder."""
    _check(n_nodes, replicas, "group")
    count = n_nodes // replicas
    out = [tuple(range(g * replicas, (g + 1) * replicas)) for g in range(count - 1)]
    out.append(tuple(range((count - 1) * replicas, n_nodes)))
    return tuple(out)


def _ring(members: Sequence[int], replicas: int) -> dict[int, tuple[int, ...]]:
    s = len(members)
    return {members[i]: tuple(members[(i + j) % s] for j in range(replicas)) for i in range(s)}


def place(n_nodes: int, replicas: int, strategy: Strategy | str = "group") -> Placement:
    """For each rank, the nodes that hold its snapshot, the rank itself first."""
    _check(n_nodes, replicas, strategy)
    if strategy == "ring":
        by_rank = _ring(range(n_nodes), replicas)
    else:
        by_rank = {}
        for members in groups(n_nodes, replicas):
            by_rank.update(_ring(members, replicas))
    return tuple(by_rank[r] for r in range(n_nodes))


def push_targets(placement: Placement, rank: int) -> tuple[int, ...]:
    """The peers a rank pushes its committed snapshots to (its holders other than itself)."""
    return placement[rank][1:]


def held_by(placement: Placement, node: int) -> tuple[int, ...]:
    """The other ranks whose snapshots ``node`` holds."""
    return tuple(r for r, hs in enumerate(placement) if r != node and node in hs)


def recoverable(placement: Placement, failed: Iterable[int]) -> bool:
    """Whether every failed rank still has a live holder of its snapshot."""
    dead = set(failed)
    return all(not set(placement[r]) <= dead for r in dead)


def _linear_table(length: int, max_ones: int, m: int) -> list[list[int]]:
    """``t[n][j]``: binary strings of length n (<= length) with j (<= max_ones) ones and no run
    of m ones. The last zero sits at n-1-r, followed by r < m ones (or the string is all ones).
    """
    t = [[0] * (max_ones + 1) for _ in range(length + 1)]
    t[0][0] = 1
    for n in range(1, length + 1):
        row = t[n]
        if n <= min(m - 1, max_ones):
            row[n] = 1
        for r in range(min(m - 1, n - 1) + 1):
            prev = t[n - 1 - r]
            for j in range(r, max_ones + 1):
                row[j] += prev[j - r]
    return t


def _cyclic_safe(size: int, m: int, max_failed: int) -> list[int]:
    """For j = 0..max_failed: j-subsets of a cycle of ``size`` nodes that contain no m
    cyclically consecutive nodes.

    A (not all-ones) cyclic string is a leading run of a ones, a trailing run of b ones
    (a + b < m: together they form the run that wraps around) and a middle that starts and
    ends with a zero.
    """
    top = min(max_failed, size)
    lin = _linear_table(max(size - 2, 0), top, m)
    out = [0] * (top + 1)
    for j in range(top + 1):
        if j == size:
            continue  # every node failed: nothing survives
        total = 0
        for a in range(m):
            for b in range(m - a):
                middle, inner = size - a - b, j - a - b
                if middle < 1 or inner < 0:
                    continue
                if middle == 1:
                    total += 1 if inner == 0 else 0
                elif inner <= middle - 2:
                    total += lin[middle - 2][inner]
        out[j] = total
    return out


def _safe_subsets(n_nodes: int, replicas: int, failures: int, strategy: str) -> int:
    """Number of ``failures``-subsets of nodes that are recoverable."""
    ring = strategy == "ring"
    components = [n_nodes] if ring else [len(g) for g in groups(n_nodes, replicas)]
    poly = [1]
    for size in components:
        comp = _cyclic_safe(size, replicas, failures)
        nxt = [0] * min(len(poly) + len(comp) - 1, failures + 1)
        for i, p in enumerate(poly):
            for j, c in enumerate(comp):
                if i + j <= failures:
                    nxt[i + j] += p * c
        poly = nxt
    return poly[failures] if failures < len(poly) else 0


def recoverable_probability(
    n_nodes: int, replicas: int, failures: int, strategy: Strategy | str = "group"
) -> Fraction:
    """Exact probability that ``failures`` simultaneous node failures, every subset equally
    likely, leave every rank's snapshot in some live node's RAM.
    """
    _check(n_nodes, replicas, strategy)
    if isinstance(failures, bool) or not isinstance(failures, int) or not 0 <= failures <= n_nodes:
        raise InvalidValue("failures", failures, f"must be an integer in [0, {n_nodes}]")
    safe = _safe_subsets(n_nodes, replicas, failures, strategy)
    return Fraction(safe, math.comb(n_nodes, failures))
