"""Placement: Gemini group and ring placement, exact recoverability vs Gemini's figures."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervise import InvalidValue
from supervise.cluster.placement import (
    groups,
    held_by,
    place,
    push_targets,
    recoverable,
    recoverable_probability,
)


def test_group_placement_divisible() -> None:
    p = place(6, 2)
    assert p == ((0, 1), (1, 0), (2, 3), (3, 2), (4, 5), (5, 4))
    assert groups(6, 3) == ((0, 1, 2), (3, 4, 5))
    assert place(6, 3)[4] == (4, 5, 3)


def test_group_placement_remainder_is_ring_inside_last_group() -> None:
    assert groups(7, 2) == ((0, 1), (2, 3), (4, 5, 6))
    p = place(7, 2)
    assert p[4:] == ((4, 5), (5, 6), (6, 4))
    assert push_targets(p, 6) == (4,)
    assert held_by(p, 4) == (6,)
    assert groups(11, 4) == ((0, 1, 2, 3), (4, 5, 6, 7, 8, 9, 10))
    assert place(11, 4)[9] == (9, 10, 4, 5)


def test_ring_placement() -> None:
    p = place(5, 3, "ring")
    assert p[0] == (0, 1, 2)
    assert p[4] == (4, 0, 1)
    assert held_by(p, 0) == (3, 4)


def test_trivial_placements() -> None:
    assert place(1, 1) == ((0,),)
    assert place(3, 1) == ((0,), (1,), (2,))
    assert place(3, 3) == ((0, 1, 2), (1, 2, 0), (2, 0, 1))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1), "n_nodes = 0"),
        ((3, 0), "replicas = 0"),
        ((2, 3), r"replicas = 3: must be <= the number of nodes \(2\)"),
        ((4, 2, "star"), "placement = 'star': must be one of 'group', 'ring'"),
        ((True, 1), "n_nodes = True"),
    ],
)
def test_bad_arguments(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(InvalidValue, match=match):
        place(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("k", "group", "ring"),
    [(2, 93.3, 86.7), (3, 80.0, 62.9), (4, 61.5, 36.3)],
)
def test_gemini_figures_n16_m2(k: int, group: float, ring: float) -> None:
    assert round(float(recoverable_probability(16, 2, k, "group")) * 100, 1) == group
    assert round(float(recoverable_probability(16, 2, k, "ring")) * 100, 1) == ring


def test_exact_values() -> None:
    assert recoverable_probability(16, 2, 2) == Fraction(112, 120)
    assert recoverable_probability(16, 2, 2, "ring") == Fraction(104, 120)
    assert recoverable_probability(16, 2, 0) == 1
    assert recoverable_probability(16, 2, 9) == 0  # pigeonhole: some group loses both
    assert recoverable_probability(4, 1, 1) == 0
    with pytest.raises(InvalidValue, match="failures = 17"):
        recoverable_probability(16, 2, 17)


def _brute(n: int, m: int, k: int, strategy: str) -> Fraction:
    p = place(n, m, strategy)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(recoverable(p, s) for s in subsets), len(subsets))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 11).flatmap(
        lambda n: st.tuples(
            st.just(n), st.integers(1, n), st.integers(0, n), st.sampled_from(["group", "ring"])
        )
    )
)
def test_probability_matches_enumeration(case: tuple[int, int, int, str]) -> None:
    n, m, k, strategy = case
    assert recoverable_probability(n, m, k, strategy) == _brute(n, m, k, strategy)


def test_large_cluster_is_fast_and_sane() -> None:
    group = recoverable_probability(1024, 2, 8)
    ring = recoverable_probability(1024, 2, 8, "ring")
    assert 0 < ring < group < 1
