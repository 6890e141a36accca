"""Replication by placement: only a rank's own node pushes its shards, only to its holders;
only its holders fetch them; a client does neither."""

from __future__ import annotations

import pytest

from supervise.cluster.access import ReplicaAccess
from supervise.cluster.placement import place


def test_pushes_come_from_the_owner_to_its_holders_only() -> None:
    # 4 nodes, 2 ranks each, groups {0,1} and {2,3}: node 1 holds ranks 0..3
    access = ReplicaAccess(place(4, 2), node=1, ranks_per_node=2)
    assert access.push(0, 0) is None and access.push(1, 0) is None
    assert access.push(2, 1) is None  # its own ranks (a fetch back, a test)
    assert "only its node 0 may" in (access.push(0, 2) or "")
    assert "a client pushed" in (access.push(0, None) or "")
    assert "does not hold rank 4" in (access.push(4, 2) or "")  # group {2,3}: not node 1's
    assert "not a rank of this cluster" in (access.push(8, 3) or "")
    assert "not a rank of this cluster" in (access.push(-5, 0) or "")
    assert "not a rank of this cluster" in (access.push(2**63, 0) or "")


def test_fetches_by_the_ranks_holders_only() -> None:
    access = ReplicaAccess(place(4, 2), node=1, ranks_per_node=2)
    assert access.fetch(0, 0) is None  # a replacement node 0 takes its own rank back
    assert access.fetch(0, 1) is None
    assert "only its holders [0, 1] may" in (access.fetch(0, 2) or "")
    assert "a client asked" in (access.fetch(0, None) or "")
    assert "not a rank of this cluster" in (access.fetch(99, 0) or "")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="node 4 is not in a placement of 4"):
        ReplicaAccess(place(4, 2), node=4)
    with pytest.raises(ValueError, match="ranks_per_node = 0"):
        ReplicaAccess(place(4, 2), node=0, ranks_per_node=0)
