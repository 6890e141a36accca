"""Who may push or fetch which rank's shards at a node: the placement decides.

A shard of rank R comes from R's own node (its owner: ``R // ranks_per_node``) and is held
only by the owner's holders (``placement[owner]``); only those nodes fetch it (a replacement
node fetches its own ranks). A client (no rank) neither pushes nor fetches. Each rule returns
None when the sender may, else a one-line reason (the transport refuses and counts it).
"""

from __future__ import annotations

import attrs

from supervise.cluster.placement import Placement


@attrs.frozen(slots=True)
class ReplicaAccess:
    """The replication rules of node ``node`` in a cluster placed by ``placement``."""

    placement: Placement
    node: int
    ranks_per_node: int = 1

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.node < len(self.placement):
            raise ValueError(f"node {self.node} is not in a placement of {len(self.placement)}")
        if isinstance(self.ranks_per_node, bool) or self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node = {self.ranks_per_node!r}: must be >= 1")

    def owner(self, rank: int) -> int | None:
        """The node that runs ``rank`` (None: no node of this cluster does)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            return None
        node = rank // self.ranks_per_node
        return node if node < len(self.placement) else None

    def holders(self, rank: int) -> tuple[int, ...]:
        """The nodes that hold ``rank``'s shards, its owner first (none for a stranger rank)."""
        owner = self.owner(rank)
        return () if owner is None else self.placement[owner]

    def push(self, rank: int, sender: int | None) -> str | None:
        """May ``sender`` push a shard of ``rank`` to this node?"""
        owner = self.owner(rank)
        if owner is None:
            return f"rank {rank} is not a rank of this cluster"
        if sender != owner:
            who = "a client" if sender is None else f"node {sender}"
            return f"{who} pushed a shard of rank {rank}: only its node {owner} may"
        if self.node not in self.placement[owner]:
            return f"node {self.node} does not hold rank {rank}'s shards (placement)"
        return None

    def fetch(self, rank: int, sender: int | None) -> str | None:
        """May ``sender`` fetch a shard of ``rank`` from this node?"""
        holders = self.holders(rank)
        if not holders:
            return f"rank {rank} is not a rank of this cluster"
        if sender is None or sender not in holders:
            who = "a client" if sender is None else f"node {sender}"
            return f"{who} asked for rank {rank}'s shard: only its holders {list(holders)} may"
        return None
