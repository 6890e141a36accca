"""ReplicaHolder as a supervised Server: pushes on commit, fetch on call, restarts keep replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
from clusterkit import eventually, free_ports
from test_replica_store import make_shard

import supervise as sv
from supervise.agents.replica_holder import (
    STATUS,
    FetchResult,
    FetchShard,
    LocalCommit,
    ReplicaHolder,
    fetch_shard_via,
    replica_budget,
)
from supervise.cluster import Transport
from supervise.cluster.failure_detector import DetectorConfig
from supervise.cluster.local import MemoryShards
from supervise.cluster.membership import Membership
from supervise.cluster.replica_store import ReplicaStore

MiB = 1 << 20


@attrs.define
class Node:
    rank: int
    local: MemoryShards
    store: ReplicaStore
    sup: Any = None

    @property
    def holder(self) -> Any:
        ref = sv.whereis(f"replicas-{self.rank}")
        assert ref is not None
        return ref


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    n = 3
    policy = sv.Policy.from_dict({"replication": {"replicas": 3}})
    endpoints = [f"127.0.0.1:{p}" for p in free_ports(n)]
    async with trio.open_nursery() as nursery:
        out = []
        for r in range(n):
            t = Transport(
                rank=r,
                endpoint=endpoints[r],
                peers={x: ep for x, ep in enumerate(endpoints) if x != r},
            )
            local = MemoryShards([r])
            store = ReplicaStore(budget=64 * MiB)
            membership = Membership(t, range(n), DetectorConfig(interval=0.1, timeout=5.0))
            tree = sv.Supervisor(
                [
                    sv.child(t.serve, id="transport"),
                    sv.child(membership.run, id="membership"),
                    sv.child(
                        ReplicaHolder,
                        t,
                        policy,
                        local,
                        node=r,
                        n_nodes=n,
                        membership=membership,
                        store=store,
                        id="replicas",
                        name=f"replicas-{r}",
                    ),
                ],
                strategy="rest_for_one",
            )
            node = Node(r, local, store)
            node.sup = await nursery.start(tree.run)
            out.append(node)
        yield out
        nursery.cancel_scope.cancel()


async def test_commit_is_pushed_to_group_peers(nodes: list[Node]) -> None:
    meta, data = make_shard(0, 5, [MiB, 1000])
    nodes[0].local.commit(meta, data)
    nodes[0].holder.cast(LocalCommit(0))  # never waits
    for r in (1, 2):  # replicas = 3: everyone holds rank 0
        await eventually(lambda r=r: nodes[r].store.get(0) is not None)
        rep = nodes[r].store.get(0)
        assert rep is not None and bytes(rep.data()) == data
    status = await nodes[1].holder.call(STATUS)
    assert status["replicas"] == {0: [(5, 0)]}
    assert status["held_bytes"] <= status["budget"]


async def test_replacement_fetches_through_the_holder(nodes: list[Node]) -> None:
    meta, data = make_shard(1, 9, [2 * MiB])
    nodes[1].local.commit(meta, data)
    nodes[1].holder.cast(LocalCommit(1))
    await eventually(lambda: nodes[2].store.get(1) is not None)
    nodes[1].local._shards[1].clear()  # node 1 lost its RAM
    got = await fetch_shard_via(nodes[1].holder, 1)
    assert got == meta
    found = nodes[1].local.get(1)
    assert found is not None and bytes(found[1]) == data
    # an unavailable version is an answer, not a crash
    result = await nodes[1].holder.call(FetchShard(1, 77))
    assert isinstance(result, FetchResult) and result.meta is None
    with pytest.raises(LookupError, match="version 77 of rank 1"):
        await fetch_shard_via(nodes[1].holder, 1, 77)
    assert (await nodes[1].sup.which_children())[2].restarts == 0


async def test_a_crash_restarts_the_holder_and_keeps_replicas(nodes: list[Node]) -> None:
    meta, data = make_shard(2, 3, [MiB])
    nodes[2].local.commit(meta, data)
    nodes[2].holder.cast(LocalCommit(2))
    await eventually(lambda: nodes[0].store.get(2) is not None)
    old = nodes[0].holder
    old.cast("garbage")  # a bug: the server crashes, its supervisor restarts it
    await eventually(lambda: sv.whereis("replicas-0") not in (None, old))
    info = await nodes[0].sup.which_children()
    assert [c.restarts for c in info] == [0, 0, 1]
    status = await nodes[0].holder.call(STATUS)
    assert status["replicas"][2] == [(3, 0)]  # the verified replica survived the restart
    # and it still serves and receives
    meta2, data2 = make_shard(2, 4, [MiB])
    nodes[2].local.commit(meta2, data2)
    nodes[2].holder.cast(LocalCommit(2))
    await eventually(lambda: nodes[0].store.inventory().get(2) == [(4, 0)])


def test_replica_budget() -> None:
    policy = sv.Policy.from_dict({"retention": {"memory_budget": "50%"}})
    assert replica_budget(policy, local_bytes=100, total_ram=1000) == 400
    with pytest.raises(ValueError, match=r"memory_budget = 50% leaves nothing .*\(600 bytes\)"):
        replica_budget(policy, local_bytes=600, total_ram=1000)
