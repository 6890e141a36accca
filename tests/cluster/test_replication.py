"""Push and fetch over real zmq links in one process: acks, credits, verification, supersede."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from clusterkit import eventually
from test_replica_store import make_shard

from supervise.cluster import RemoteError, Transport
from supervise.cluster._dealer import PendingReply
from supervise.cluster.errors import ChecksumMismatch
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.replication import (
    PushAck,
    PushBegin,
    PushChunk,
    PushDone,
    PushEnd,
    PushReady,
    ReplicaEndpoint,
    fetch_shard,
    inventory,
    push_shard,
    transfer_timeout,
)
from supervise.cluster.replicator import ReplicationTuning

KiB = 1024
MiB = 1 << 20


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Transport, Transport, ReplicaEndpoint]]:
    holder = Transport(rank=1, endpoint="127.0.0.1:0")
    owner = Transport(rank=0, endpoint="127.0.0.1:0")
    async with holder.running(), owner.running():
        assert holder.endpoint is not None
        owner.set_peer(1, holder.endpoint)
        endpoint = ReplicaEndpoint(holder, ReplicaStore(budget=64 * MiB))
        endpoint.install()
        yield owner, holder, endpoint


async def test_push_then_fetch_byte_for_byte(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, _, endpoint = pair
    meta, data = make_shard(0, 10, [3 * MiB, 1 * MiB + 5, 77])
    assert await push_shard(owner, 1, meta, memoryview(data), chunk_size=256 * KiB, window=4)
    assert endpoint.store.inventory() == {0: [(10, 0)]}
    assert not await push_shard(owner, 1, meta, memoryview(data))  # held: nothing sent
    got_meta, got = await fetch_shard(owner, 1, 0, chunk_size=300 * KiB, window=3)
    assert got_meta == meta
    assert bytes(got) == data
    inv = await inventory(owner, 1)
    assert inv.held == [(0, 10, 0)] and inv.held_bytes <= inv.budget
    # ranged: into a caller-supplied destination
    dest = bytearray(meta.nbytes + 100)
    _, view = await fetch_shard(owner, 1, 0, version=10, into=lambda m: memoryview(dest))
    assert bytes(view) == data
    assert not endpoint._leases  # every lease closed


async def test_corrupt_push_is_refused_and_never_served(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, _, endpoint = pair
    meta, data = make_shard(0, 10, [MiB, MiB])
    bad = bytearray(data)
    bad[MiB + 12345] ^= 0xFF
    with pytest.raises(RemoteError, match=r"tensor 't1'.*does not match its checksum"):
        await push_shard(owner, 1, meta, memoryview(bytes(bad)), chunk_size=128 * KiB)
    assert endpoint.store.inventory() == {}
    assert endpoint.store.receptions() == []
    with pytest.raises(RemoteError, match="LookupError: no replica of rank 0"):
        await fetch_shard(owner, 1, 0)


async def test_replica_corrupted_in_ram_is_dropped_after_a_failed_fetch(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, _, endpoint = pair
    old, old_data = make_shard(0, 10, [MiB])
    new, new_data = make_shard(0, 20, [MiB])
    store = endpoint.store
    store.keep_last = 2
    assert await push_shard(owner, 1, old, memoryview(old_data))
    assert await push_shard(owner, 1, new, memoryview(new_data))
    rep = store.get(0, 20)
    assert rep is not None
    rep.pieces()[0][777] ^= 0xFF  # flipped in the holder's RAM after it was verified
    with pytest.raises(ChecksumMismatch):
        await fetch_shard(owner, 1, 0, version=20)
    # The holder checked its copy, found it bad and dropped it: never served or offered
    # again (a restart selects the version before), and what is intact stays.
    await eventually(lambda: store.inventory() == {0: [(10, 0)]})
    with pytest.raises(RemoteError, match="no replica of rank 0 at version 20"):
        await fetch_shard(owner, 1, 0, version=20)
    _, got = await fetch_shard(owner, 1, 0, version=10)
    assert bytes(got) == old_data
    assert not endpoint._leases


async def test_truncated_push_is_never_served(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, _, endpoint = pair
    meta, data = make_shard(0, 10, [2 * MiB])
    begin = PushBegin(
        0,
        10,
        0,
        meta.nbytes,
        [(c.name, c.offset, c.nbytes, c.digest) for c in meta.checks],
        checksum=meta.checksum.value,
    )
    ready = await owner.request(1, begin, [meta.manifest], expect=PushReady)
    tid = ready.body.transfer
    await owner.request(1, PushChunk(tid, 0), [data[:MiB]], expect=PushAck)
    with pytest.raises(RemoteError, match=f"finished after {MiB} of {2 * MiB} bytes"):
        await owner.request(1, PushEnd(tid), expect=PushDone)  # cut short
    assert endpoint.store.inventory() == {}
    assert endpoint.store.receptions() == []
    with pytest.raises(RemoteError, match="LookupError: no replica of rank 0"):
        await fetch_shard(owner, 1, 0)


async def test_cancelled_push_aborts_at_the_receiver_and_newer_supersedes(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, holder, endpoint = pair
    old, old_data = make_shard(0, 10, [4 * MiB])
    new, new_data = make_shard(0, 20, [4 * MiB])
    # slow the receiver down so the first push is surely mid-flight when cancelled
    chunk_handler = holder._router._handlers["replica.push_chunk"]
    seen = trio.Event()

    async def slow_chunk(msg):  # type: ignore[no-untyped-def]
        seen.set()
        await trio.sleep(0.02)
        return await chunk_handler(msg)

    holder._router._handlers["replica.push_chunk"] = slow_chunk
    async with trio.open_nursery() as n:
        scope = trio.CancelScope()

        async def first() -> None:
            with scope:
                await push_shard(owner, 1, old, memoryview(old_data), chunk_size=256 * KiB)

        n.start_soon(first)
        await seen.wait()
        scope.cancel()  # a newer version was committed: supersede
    await eventually(lambda: endpoint.store.receptions() == [])
    assert endpoint.store.inventory() == {}
    holder._router._handlers["replica.push_chunk"] = chunk_handler
    assert await push_shard(owner, 1, new, memoryview(new_data))
    with pytest.raises(RemoteError, match="stale"):
        await push_shard(owner, 1, old, memoryview(old_data))
    _, got = await fetch_shard(owner, 1, 0)
    assert bytes(got) == new_data


async def test_chunks_from_a_stranger_are_refused(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, holder, endpoint = pair
    meta, data = make_shard(0, 10, [2 * MiB])
    begin = PushBegin(
        0,
        10,
        0,
        meta.nbytes,
        [(c.name, c.offset, c.nbytes, c.digest) for c in meta.checks],
        checksum=meta.checksum.value,
    )
    ready = await owner.request(1, begin, [meta.manifest], expect=PushReady)
    tid = ready.body.transfer
    other = Transport(rank=2, peers={1: holder.endpoint or ""})
    async with other.running():
        with pytest.raises(RemoteError, match="not in flight from this sender"):
            await other.request(1, PushChunk(tid, 0), [data[:100]])
    # the owner's transfer is unharmed
    await owner.request(1, PushChunk(tid, 0), [data], expect=PushAck)
    await owner.request(1, PushEnd(tid), expect=PushDone)
    assert endpoint.store.inventory() == {0: [(10, 0)]}


async def test_budget_refusal_keeps_what_is_held(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, _, endpoint = pair
    endpoint.store.budget = 3 * MiB
    meta, data = make_shard(0, 10, [2 * MiB])
    assert await push_shard(owner, 1, meta, memoryview(data))
    newer, newer_data = make_shard(0, 11, [2 * MiB])
    with pytest.raises(RemoteError, match="budget"):
        await push_shard(owner, 1, newer, memoryview(newer_data))
    _, got = await fetch_shard(owner, 1, 0)
    assert bytes(got) == data


async def test_chunks_arrive_as_one_frame_each_and_an_oversized_one_fails_the_push(
    pair: tuple[Transport, Transport, ReplicaEndpoint],
) -> None:
    owner, holder, endpoint = pair
    meta, data = make_shard(0, 10, [MiB, 300 * KiB])
    seen: list[tuple[int, int]] = []
    handler = holder._router._handlers["replica.push_chunk"]

    async def spy(msg):  # type: ignore[no-untyped-def]
        seen.append((len(msg.placed), len(msg.frames)))
        return await handler(msg)

    holder._router._handlers["replica.push_chunk"] = spy
    assert await push_shard(owner, 1, meta, memoryview(data), chunk_size=256 * KiB, window=2)
    # each chunk stays in libzmq's buffer: hashed there, then copied into place (one pass)
    assert len(seen) == 6 and all(s == (0, 1) for s in seen)
    holder._router._handlers["replica.push_chunk"] = handler
    # a chunk larger than the holder accepts fails the push at once, and nothing of it is kept
    endpoint.max_chunk = 128 * KiB
    newer, newer_data = make_shard(0, 11, [MiB])
    with pytest.raises(RemoteError, match="exceeds 131072"):
        await push_shard(owner, 1, newer, memoryview(newer_data), chunk_size=256 * KiB, window=2)
    await eventually(lambda: endpoint.store.receptions() == [])
    assert endpoint.store.inventory() == {0: [(10, 0)]}  # what was held is intact
    _, got = await fetch_shard(owner, 1, 0, chunk_size=100 * KiB)
    assert bytes(got) == data


def test_transfer_timeout_is_a_floor_plus_the_bytes_at_the_slowest_rate() -> None:
    assert transfer_timeout(0, 30.0, 8 * MiB) == 30.0
    assert transfer_timeout(64 * MiB, 30.0, 8 * MiB) == 38.0
    assert transfer_timeout(512 * KiB, 1.0, MiB) == 1.5
    for args, bad in [((-1, 1.0, 1.0), "nbytes"), ((1, 0.0, 1.0), "floor"), ((1, 1.0, 0), "rate")]:
        with pytest.raises(ValueError, match=bad):
            transfer_timeout(*args)
    with pytest.raises(ValueError, match="min_rate"):
        ReplicationTuning(min_rate=0)


async def test_waits_for_acks_and_ranges_scale_with_the_bytes_they_cover(
    pair: tuple[Transport, Transport, ReplicaEndpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, _, _ = pair
    waits: list[tuple[str, float]] = []
    wait = PendingReply.wait

    async def recorded(self: PendingReply, timeout: float = 5.0, **kw: Any) -> Any:  # noqa: ASYNC109
        waits.append((self.kind, timeout))
        return await wait(self, timeout, **kw)

    monkeypatch.setattr(PendingReply, "wait", recorded)
    meta, data = make_shard(0, 10, [3 * MiB])
    # 12 chunks of 256 KiB, window 4: an ack every 2 chunks, each covering 512 KiB
    pushed = await push_shard(
        owner, 1, meta, memoryview(data), chunk_size=256 * KiB, window=4, timeout=1.0, min_rate=MiB
    )
    assert pushed
    acks = [t for kind, t in waits if kind == "replica.push_chunk"]
    assert acks == [1.5] * 6, waits
    assert 0 < dict(waits)["replica.push_begin"] <= 1.0  # a message alone: the floor
    waits.clear()
    await fetch_shard(owner, 1, 0, chunk_size=MiB, window=2, timeout=1.0, min_rate=MiB)
    assert [t for kind, t in waits if kind == "replica.fetch_range"] == [2.0] * 3, waits


def test_the_wire_names_the_checksum_and_an_unknown_one_is_a_protocol_error() -> None:
    from supervise.cluster import ProtocolError
    from supervise.cluster.replication import _meta_in
    from supervise.snapshot import Checksum

    checks = [("t0", 0, 4, 1)]
    assert _meta_in(PushBegin(0, 1, 0, 4, checks), b"").checksum is Checksum.XXH64  # legacy
    assert _meta_in(PushBegin(0, 1, 0, 4, checks, checksum="xxh3_64"), b"").checksum is (
        Checksum.XXH3_64
    )
    with pytest.raises(ProtocolError, match="unknown checksum 'md5'"):
        _meta_in(PushBegin(0, 1, 0, 4, checks, checksum="md5"), b"")
