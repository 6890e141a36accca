"""The recoverable point in virtual time, with the real parts that keep it: each node's
`ArenaService` (keep_last = 1, a commit every step), `ReplicaStore` and `PointKeeper`; pushes
that take 0.5 to 4 steps and skip to the newest, heartbeats that arrive late. Whatever the
timing, once a first point exists some version is complete across the cluster at every moment:
every rank's owner holds it in its arena and every group peer holds its replica. (With the
retention of before, keep_last alone, none is most of the time.)"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import pytest

from supervise.agents._shards import ArenaShards
from supervise.agents.config import NodeConfig
from supervise.agents.keeper import PointKeeper
from supervise.agents.messages import INFO_STATE
from supervise.cluster.recovery_point import PINNED_VERSIONS
from supervise.cluster.replica_store import Refused, ReplicaStore
from supervise.cluster.shard import ShardMeta
from supervise.policy import Policy
from supervise.snapshot import Layout, Manifest, TensorEntry
from supervise.snapshot.budget import MemoryBudget
from supervise.snapshot.checksum import digests
from supervise.snapshot.client import LocalOwner
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService

N = 4  # group placement, m = 2: {0, 1} and {2, 3}
TICK = 0.01  # one training step
BEAT = 20  # heartbeat every 20 steps (0.2 s)
STEPS = 1500
SETTLED = 200  # steps (2 s) after which a version must be complete at every moment


LAYOUT = Layout.plan([("w", "float32", (64,))])


def shard(step: int, rank: int) -> tuple[Manifest, bytes]:
    """A tiny shard of ``rank`` at ``step`` (its bytes depend on both)."""
    data = bytes((i + step * 7 + rank) % 251 for i in range(LAYOUT.nbytes))
    sums = digests(LAYOUT.entries, memoryview(data))
    tensors = tuple(
        TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes, h)
        for e, h in zip(LAYOUT.entries, sums, strict=True)
    )
    return Manifest(step, 0, rank, N, LAYOUT.nbytes, tensors, float(step)), data


class Membership:
    """Node ``rank``'s view: node 0 leads, every node is alive and running."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.infos: dict[int, dict[str, Any]] = {}
        self.root = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def is_alive(self, rank: int) -> bool:
        return True

    def peer_info(self, rank: int) -> dict[str, Any] | None:
        return self.infos.get(rank)


class Node:
    def __init__(self, rank: int, tmp: Path, policy: Policy) -> None:
        self.rank = rank
        self.arenas = ArenaService(
            tmp / f"n{rank}",
            rule=RetentionRule(keep_last=1),
            budget=MemoryBudget(1 << 30),
            node=f"n{rank}",
            pinned_slots=PINNED_VERSIONS + 1,
        )
        self.owner = LocalOwner(self.arenas, rank)
        self.local = ArenaShards(self.arenas, [rank])
        self.store = ReplicaStore(1 << 24, keep_last=1)
        self.ms = Membership(rank)
        config = NodeConfig(
            rank, [f"127.0.0.1:{7000 + i}" for i in range(N)], ["train"], policy=policy
        )
        self.keeper = PointKeeper(
            config, self.arenas, self.store, lambda: self.ms, lambda: "running"
        )
        self.peer = rank ^ 1
        self.acked: set[tuple[int, int]] = set()
        self.push: tuple[ShardMeta, bytes, float, contextlib.ExitStack] | None = None

    def commit(self, step: int) -> None:
        m, data = shard(step, self.rank)
        self.owner.attach(m.nbytes, 1 << 16)
        slot = self.owner.begin()
        assert slot is not None, f"node {self.rank} has no free slot at step {step}"
        slot.arena.data(slot.slot, m.nbytes)[:] = data
        self.owner.commit(slot, m.to_bytes())

    def next_push(self) -> ShardMeta | None:
        """Like the replicator: a protected version the peer lacks, else the newest."""
        for gen, version in sorted(self.keeper.point.protected):
            meta = self.local.meta(self.rank, version)
            if meta is not None and meta.order == (gen, version) and meta.order not in self.acked:
                return meta
        meta = self.local.latest(self.rank)
        return None if meta is None or meta.order in self.acked else meta


def holds(nodes: list[Node], step: int) -> bool:
    """Whether ``step`` is complete across the cluster: owner's arena and the peer's replica."""
    for node in nodes:
        if step not in node.arenas.versions_by_step(node.rank):
            return False
        if nodes[node.peer].store.get(node.rank, step) is None:
            return False
    return True


@pytest.mark.parametrize("seed", range(4))
def test_some_version_is_complete_across_the_cluster_at_every_moment(
    seed: int, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    policy = Policy.from_dict(
        {
            "snapshot": {"every_steps": 1},
            "retention": {"keep_last": 1},
            "cluster": {"heartbeat_interval": BEAT * TICK, "peer_timeout": 1.0},
        }
    )
    nodes = [Node(r, tmp_path, policy) for r in range(N)]
    phase = [rng.randrange(BEAT) for _ in range(N)]
    mail: list[tuple[int, int, int, dict[str, Any]]] = []  # (due tick, to, from, info)
    first_point = None
    for tick in range(STEPS):
        now = tick * TICK
        for node in nodes:
            node.commit(tick)
        for node in nodes:  # pushes: one in flight per node, run to their end
            if node.push is not None and now >= node.push[2]:
                meta, data, _, stack = node.push
                stack.close()
                node.push = None
                store = nodes[node.peer].store
                try:
                    rec = store.begin(meta, node.rank, now)
                except Refused:
                    continue  # the peer does not protect it yet: pushed again later
                if rec is not None:
                    store.chunk(rec.id, 0, memoryview(data), now)
                    store.finish(rec.id, now)
                node.acked.add(meta.order)
            if node.push is None and (meta := node.next_push()) is not None:
                stack = contextlib.ExitStack()
                view = stack.enter_context(node.local.open(node.rank, meta.version))
                took = rng.uniform(0.5, 4.0) * TICK
                node.push = (meta, bytes(view), now + took, stack)
        for node in nodes:  # heartbeats: each node's keeper ticks, its info arrives late
            if (tick - phase[node.rank]) % BEAT == 0:
                info = {INFO_STATE: "running", **node.keeper.tick(now)}
                for other in nodes:
                    if other is not node:
                        mail.append((tick + rng.randrange(0, 4), other.rank, node.rank, info))
        for item in [m for m in mail if m[0] <= tick]:
            mail.remove(item)
            nodes[item[1]].ms.infos[item[2]] = item[3]
        if first_point is None and nodes[0].keeper.recoverable is not None:
            first_point = tick
        if tick >= SETTLED:
            complete = [s for s in nodes[0].arenas.versions_by_step(0) if holds(nodes, s)]
            assert complete, f"step {tick}: no version is complete across the cluster"
            assert first_point is not None, f"no recoverable point within {SETTLED} steps"
    assert nodes[0].keeper.point.rounds >= 10  # the point kept moving with the training
    for node in nodes:
        node.arenas.close()
        node.store.close()
