"""The replication service in one process: pushes to group peers, skip to the newest,
priority versions, lag, fetch-back."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import pytest
import structlog.testing
import trio
import trio.testing
from clusterkit import eventually
from test_replica_store import make_shard

from supervise.cluster import Transport
from supervise.cluster.failure_detector import PeerBack, PeerLost
from supervise.cluster.local import MemoryShards
from supervise.cluster.placement import place
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.replicator import ReplicationService, ReplicationTuning, _Pusher

MiB = 1 << 20


class Node:
    def __init__(
        self,
        rank: int,
        transport: Transport,
        service: ReplicationService,
        local: MemoryShards,
        scope: trio.CancelScope,
    ) -> None:
        self.rank, self.transport, self.service, self.local, self.scope = (
            rank,
            transport,
            service,
            local,
            scope,
        )


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[trio.Nursery, list[Node]]]:
    n = 4
    placement = place(n, 2)
    tuning = ReplicationTuning(chunk_size=256 * 1024, window=4, message_timeout=10)
    async with trio.open_nursery() as nursery:
        transports = [Transport(rank=r, endpoint="127.0.0.1:0") for r in range(n)]
        for t in transports:
            await nursery.start(t.serve)
        for t in transports:
            for r, other in enumerate(transports):
                if other is not t:
                    t.set_peer(r, other.endpoint or "")
        nodes = []
        for r, t in enumerate(transports):
            local = MemoryShards([r])
            svc = ReplicationService(
                t, ReplicaStore(budget=64 * MiB), local, placement, node=r, tuning=tuning
            )
            scope = trio.CancelScope()

            async def run(
                svc: ReplicationService = svc,
                scope: trio.CancelScope = scope,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with scope:
                    await svc.run(task_status=task_status)

            await nursery.start(run)
            nodes.append(Node(r, t, svc, local, scope))
        yield nursery, nodes
        nursery.cancel_scope.cancel()


async def test_commits_reach_group_peers_and_the_newest_wins(
    cluster: tuple[trio.Nursery, list[Node]],
) -> None:
    _, nodes = cluster
    shards = {r: make_shard(r, 10, [MiB, 300_000]) for r in range(4)}
    for r, (meta, data) in shards.items():
        nodes[r].local.commit(meta, data)
        nodes[r].service.committed(r)
    # group placement, m=2: {0,1} and {2,3}
    await eventually(lambda: all(nodes[r ^ 1].service.store.get(r) is not None for r in range(4)))
    for r, (_, data) in shards.items():
        rep = nodes[r ^ 1].service.store.get(r)
        assert rep is not None and bytes(rep.data()) == data
        assert nodes[(r + 2) % 4].service.store.get(r) is None  # not in its group
    # a quick succession of commits: the peer ends with the newest one
    for v in (20, 30, 40):
        meta, data = make_shard(0, v, [2 * MiB])
        nodes[0].local.commit(meta, data)
        nodes[0].service.committed(0)
    await eventually(lambda: nodes[1].service.store.inventory().get(0) == [(40, 0)])
    rep = nodes[1].service.store.get(0)
    assert rep is not None and bytes(rep.data()) == make_shard(0, 40, [2 * MiB])[1]
    status = nodes[1].service.status()
    assert status["replicas"][0] == [(40, 0)] and status["held_bytes"] <= status["budget"]


async def test_replacement_fetches_its_shard_from_a_group_peer(
    cluster: tuple[trio.Nursery, list[Node]],
) -> None:
    _, nodes = cluster
    meta, data = make_shard(2, 50, [3 * MiB + 3])
    nodes[2].local.commit(meta, data)
    nodes[2].service.committed(2)
    await eventually(lambda: nodes[3].service.store.get(2) is not None)
    # node 2 "dies": a fresh local store with nothing in it replaces it
    fresh = MemoryShards([2])
    nodes[2].service.local = fresh
    got = await nodes[2].service.fetch(2)
    assert got == meta
    found = fresh.get(2)
    assert found is not None and bytes(found[1]) == data
    with pytest.raises(LookupError, match="no live holder could provide version 99 of rank 2"):
        await nodes[2].service.fetch(2, 99)
    assert fresh.latest(2) == meta  # a failed fetch changed nothing


async def test_restarted_peer_gets_the_shard_again(
    cluster: tuple[trio.Nursery, list[Node]],
) -> None:
    _, nodes = cluster
    meta, data = make_shard(0, 7, [MiB])
    nodes[0].local.commit(meta, data)
    nodes[0].service.committed(0)
    # The sender counts the push once the receiver's verdict is back, which can be after the
    # receiver stored it: wait for both, or the first push would pass for the second.
    await eventually(lambda: nodes[1].service.store.get(0) is not None)
    await eventually(lambda: nodes[0].service.pushed == 1)
    pushed = nodes[0].service.pushed
    # node 1 restarts and loses its RAM: membership reports it lost, then back as a new process
    nodes[1].service.store.close()
    nodes[1].service.store = nodes[1].service.endpoint.store = ReplicaStore(budget=64 * MiB)
    nodes[0].service.membership_event(PeerLost(1, 10.0))
    nodes[0].service.membership_event(PeerBack(1, incarnation=2, restarted=True))
    await eventually(lambda: nodes[0].service.pushed == pushed + 1)
    assert nodes[1].service.store.get(0) is not None


async def test_priority_versions_reach_the_peer_before_the_newest_and_the_lag_is_known(
    cluster: tuple[trio.Nursery, list[Node]],
) -> None:
    _, nodes = cluster
    assert nodes[0].service.lag(0) is None  # nothing committed yet
    target, target_data = make_shard(0, 10, [MiB])
    nodes[0].local = MemoryShards([0], keep=3)
    nodes[0].service.local = nodes[0].local
    nodes[1].service.store.protect({(0, 10)})  # the peer keeps the target once it arrives
    nodes[0].service.prioritize({(0, 10)})
    nodes[0].local.commit(target, target_data)
    for v in (11, 12):
        meta, data = make_shard(0, v, [MiB])
        nodes[0].local.commit(meta, data)
    nodes[0].service.committed(0)
    store = nodes[1].service.store
    await eventually(lambda: store.inventory().get(0) == [(12, 0), (10, 0)])
    rep = store.get(0, 10)
    assert rep is not None and bytes(rep.data()) == target_data
    await eventually(lambda: nodes[0].service.lag(0) == 0)
    assert nodes[0].service.acked(0, (0, 10)) and nodes[0].service.acked(0, (0, 12))
    assert not nodes[0].service.acked(0, (0, 11))  # skipped: the newest went instead
    assert nodes[0].service.status()["lag"] == {0: 0}


async def test_a_priority_version_the_peer_declines_is_no_warning_and_offered_again(
    cluster: tuple[trio.Nursery, list[Node]],
) -> None:
    # The nodes hear of a new recoverable-point target a heartbeat apart: a peer that holds a
    # newer replica and does not keep the target (yet, or any more) declines it as stale.
    # Routine: no warning (a healthy run logs none), the newest still goes, and the target is
    # offered again later (once the peer keeps it, it takes it).
    _, nodes = cluster
    nodes[0].local = MemoryShards([0], keep=10)
    nodes[0].service.local = nodes[0].local
    store = nodes[1].service.store
    for v in (10, 12):
        meta, data = make_shard(0, v, [MiB])
        nodes[0].local.commit(meta, data)
    nodes[0].service.committed(0)
    await eventually(lambda: store.inventory().get(0) == [(12, 0)])
    with structlog.testing.capture_logs() as logs:
        nodes[0].service.prioritize({(0, 10)})  # the peer does not protect it
        await eventually(lambda: any(x["event"] == "priority push declined" for x in logs))
        meta, data = make_shard(0, 13, [MiB])
        nodes[0].local.commit(meta, data)
        nodes[0].service.committed(0)
        await eventually(lambda: store.inventory().get(0) == [(13, 0)])  # the newest went
        assert not nodes[0].service.acked(0, (0, 10))
        store.protect({(0, 10)})  # the peer heard of the target
        await eventually(lambda: (nodes[0].service.committed(0), store.get(0, 10))[1])
    assert nodes[0].service.acked(0, (0, 10))
    assert [x for x in logs if x["log_level"] not in ("debug", "info")] == []


async def test_with_every_the_newest_waits_its_turn_and_priority_versions_do_not(
    cluster: tuple[trio.Nursery, list[Node]],
) -> None:
    # replication.every_seconds: the first commit goes at once, the next newest only when
    # its turn comes; a priority version (the recoverable point's target) goes at once
    _, nodes = cluster
    svc = nodes[0].service
    svc.every = 3600.0
    nodes[0].local = svc.local = MemoryShards([0], keep=4)
    store = nodes[1].service.store
    store.protect({(0, 11)})
    for v in (10, 11, 12):
        meta, data = make_shard(0, v, [MiB])
        nodes[0].local.commit(meta, data)
        svc.committed(0)
        if v == 10:
            await eventually(lambda: svc.acked(0, (0, 10)))
    await trio.testing.wait_all_tasks_blocked()
    assert svc.status()["pushing"] == [] and store.inventory()[0] == [(10, 0)]
    svc.prioritize({(0, 11)})
    await eventually(lambda: svc.acked(0, (0, 11)))
    await trio.testing.wait_all_tasks_blocked()
    assert svc.status()["pushing"] == [] and store.get(0, 12) is None
    assert svc.lag(0) == 1  # the newest (12) waits for its turn


def test_the_newest_is_due_every_seconds_after_the_last_push_twice_that_before_a_target() -> None:
    local = MemoryShards([0], keep=4)
    svc = ReplicationService(
        Transport(rank=0, endpoint="127.0.0.1:0"),
        ReplicaStore(budget=64 * MiB),
        local,
        place(2, 2),
        node=0,
        every=10.0,
    )
    p = _Pusher()
    assert svc._next(0, p, 0.0) == (None, math.inf)  # nothing committed: wait to be poked
    meta, data = make_shard(0, 10, [4096])
    local.commit(meta, data)
    assert svc._next(0, p, 0.0) == (meta, 0.0)  # the first push goes at once
    p.last = 100.0
    assert svc._next(0, p, 104.0) == (None, 6.0)
    assert svc._next(0, p, 110.0) == (meta, 0.0)
    svc.prioritize({(0, 5), (0, 20)})  # the point, and a target ahead: it is what goes
    assert svc._next(0, p, 110.0) == (None, 10.0)
    assert svc._next(0, p, 120.0) == (meta, 0.0)  # unless it is late
    target, data = make_shard(0, 20, [4096])
    local.commit(target, data)
    assert svc._next(0, p, 101.0) == (target, 0.0)  # a priority version never waits
    p.ack(target.order)
    assert svc._next(0, p, 101.0) == (None, math.inf)  # the peer holds the newest
    svc.every = 0.0
    newest, data = make_shard(0, 21, [4096])
    local.commit(newest, data)
    assert svc._next(0, p, 101.0) == (newest, 0.0)  # every commit by default
    with pytest.raises(ValueError, match="every must be >= 0 seconds"):
        ReplicationService(svc.transport, svc.store, local, place(2, 2), node=0, every=-1)


def test_every_local_rank_goes_to_the_nodes_group_peers() -> None:
    # placement is by node: with 2 ranks per node, node 1 runs ranks 2 and 3, and both go to
    # node 0 (before: rank 2 and 3 were looked up as nodes and went nowhere)
    t = Transport(rank=1, endpoint="127.0.0.1:0")
    svc = ReplicationService(t, ReplicaStore(budget=MiB), MemoryShards([2, 3]), place(2, 2), node=1)
    assert svc.targets(2) == svc.targets(3) == (0,)


def test_a_lost_peers_pushes_in_flight_give_their_memory_back_at_once() -> None:
    t = Transport(rank=0, endpoint="127.0.0.1:0")
    store = ReplicaStore(budget=64 * MiB)
    svc = ReplicationService(t, store, MemoryShards([0]), place(3, 3), node=0)
    meta, _ = make_shard(1, 1, [4 * MiB])
    other, _ = make_shard(2, 1, [MiB])
    assert store.begin(meta, source=1, now=0.0) is not None
    assert store.begin(other, source=2, now=0.0) is not None
    svc.membership_event(PeerLost(1, 3.0))
    assert [r.source for r in store.receptions()] == [2]
    assert store.held_bytes < 2 * MiB  # node 1's 4 MiB went back, not into the reuse pool
