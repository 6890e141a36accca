"""The sans-IO replica store: streaming verification, supersede, budget, retention, pins."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from supervise.cluster import ChecksumMismatch, ProtocolError
from supervise.cluster.replica_store import GROWTH, SLACK, Refused, ReplicaStore
from supervise.cluster.shard import Check, ShardMeta, StreamVerifier
from supervise.snapshot import CapacityError, Checksum, MemoryBudget

KiB = 1024
MiB = 1024 * KiB


def _meta(rank: int, version: int, nbytes: int) -> ShardMeta:
    """A shard description only (no data): what a push_begin announces."""
    return ShardMeta(rank, version, 0, nbytes, [Check("t", 0, nbytes, 0)], b"m")


def make_shard(
    rank: int, version: int, sizes: list[int], generation: int = 0, seed: int | None = None
) -> tuple[ShardMeta, bytes]:
    rng = np.random.default_rng(seed if seed is not None else rank * 1000 + version)
    data = rng.integers(0, 256, sum(sizes), dtype=np.uint8).tobytes()
    checks, off = [], 0
    for i, n in enumerate(sizes):
        checks.append(Check(f"t{i}", off, n, xxhash.xxh3_64_intdigest(data[off : off + n])))
        off += n
    return ShardMeta(rank, version, generation, len(data), checks, b"manifest"), data


_clock = itertools.count(1)


def push(store: ReplicaStore, meta: ShardMeta, data: bytes, chunk: int = 7 * KiB) -> None:
    now = float(next(_clock))
    rec = store.begin(meta, source=meta.rank, now=now)
    assert rec is not None
    for off in range(0, len(data), chunk):
        store.chunk(rec.id, off, memoryview(data)[off : off + chunk], now=now)
    store.finish(rec.id, now=now)


# ---- the verifier ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=8),
    chunk=st.integers(1, 6000),
    flip=st.one_of(st.none(), st.integers(0, 10**9)),
)
def test_verifier_any_chunking(sizes: list[int], chunk: int, flip: int | None) -> None:
    meta, data = make_shard(0, 1, sizes)
    buf = bytearray(data)
    if flip is not None and data:
        buf[flip % len(buf)] ^= 0x40
    v = StreamVerifier.for_shard(meta)
    mv = memoryview(bytes(buf))
    if flip is not None and data:
        with pytest.raises(ChecksumMismatch, match=r"tensor 't\d+' \(bytes \d+\.\.\d+\)"):
            for off in range(0, len(mv), chunk):
                v.feed(mv[off : off + chunk])
    else:
        for off in range(0, len(mv), chunk):
            v.feed(mv[off : off + chunk])
        assert v.complete
        assert v.verified == sum(1 for s in sizes if s)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    chunk=st.integers(1, 6000),
    block=st.integers(1, 3000),
    flip=st.one_of(st.none(), st.integers(0, 10**9)),
)
def test_verifier_feed_into_hashes_and_copies_block_by_block(
    sizes: list[int], chunk: int, block: int, flip: int | None
) -> None:
    meta, data = make_shard(0, 1, sizes)
    buf = bytearray(data)
    if flip is not None and data:
        buf[flip % len(buf)] ^= 0x40
    v = StreamVerifier.for_shard(meta)
    mv, dest = memoryview(bytes(buf)), bytearray(len(buf))
    out = memoryview(dest)
    if flip is not None and data:
        with pytest.raises(ChecksumMismatch, match=r"tensor 't\d+'"):
            for off in range(0, len(mv), chunk):
                v.feed_into(mv[off : off + chunk], out[off : off + chunk], block)
    else:
        for off in range(0, len(mv), chunk):
            v.feed_into(mv[off : off + chunk], out[off : off + chunk], block)
        assert v.complete and bytes(dest) == data


def test_verifier_feed_into_needs_a_destination_of_the_same_size() -> None:
    meta, data = make_shard(0, 1, [100])
    v = StreamVerifier.for_shard(meta)
    with pytest.raises(ValueError, match="destination of 99 bytes for 100 bytes"):
        v.feed_into(memoryview(data), memoryview(bytearray(99)))
    assert v.position == 0


def test_shard_meta_validation() -> None:
    with pytest.raises(ValueError, match="'b' overlaps"):
        ShardMeta(0, 1, 0, 100, [Check("a", 0, 60, 0), Check("b", 50, 10, 0)])
    with pytest.raises(ValueError, match="beyond the data region"):
        ShardMeta(0, 1, 0, 100, [Check("a", 90, 20, 0)])
    with pytest.raises(ValueError, match="version"):
        ShardMeta(0, -1, 0, 100, [])


def test_verifier_checks_shards_written_before_xxh3_with_xxhash64() -> None:
    data = bytes(range(200))
    checks = [
        Check("a", 0, 120, xxhash.xxh64_intdigest(data[:120])),
        Check("e", 120, 0, xxhash.xxh64_intdigest(b"")),
        Check("b", 120, 80, xxhash.xxh64_intdigest(data[120:])),
    ]
    meta = ShardMeta(0, 1, 0, 200, checks, b"m", "xxh64")
    assert meta.checksum is Checksum.XXH64
    v = StreamVerifier.for_shard(meta)
    v.feed(memoryview(data))
    assert v.complete and v.verified == 2
    xxh3 = [Check("a", 0, 200, xxhash.xxh3_64_intdigest(data))]
    StreamVerifier.for_shard(ShardMeta(0, 1, 0, 200, xxh3, b"m")).feed(memoryview(data))
    with pytest.raises(ChecksumMismatch, match="tensor 'a'"):  # the algorithms differ
        StreamVerifier.for_shard(ShardMeta(0, 1, 0, 200, xxh3, b"m", "xxh64")).feed(
            memoryview(data)
        )
    with pytest.raises(ValueError, match=r"unknown checksum 'crc32' \(known: xxh64, xxh3_64\)"):
        ShardMeta(0, 1, 0, 200, checks, b"m", "crc32")


def test_verifier_rejects_overrun() -> None:
    meta, data = make_shard(0, 1, [100])
    v = StreamVerifier.for_shard(meta)
    with pytest.raises(ChecksumMismatch, match="beyond the data region"):
        v.feed(memoryview(data + b"x"))


# ---- the store ---------------------------------------------------------------------------


def test_complete_and_verified_replica_is_servable() -> None:
    store = ReplicaStore(budget=1 << 20)
    meta, data = make_shard(1, 10, [3000, 5000, 17])
    rec = store.begin(meta, source=1, now=0.0)
    assert rec is not None
    store.chunk(rec.id, 0, memoryview(data)[:4000], now=0.0)
    assert store.get(1) is None  # partial: not servable
    with pytest.raises(ProtocolError, match="finished after 4000 of 8017 bytes"):
        store.finish(rec.id, now=0.0)
    assert store.get(1) is None and store.receptions() == []
    push(store, meta, data)
    rep = store.get(1)
    assert rep is not None and bytes(rep.data()) == data
    # a range spanning pieces: one view per piece (the default chunk of `push` is 7 KiB)
    assert [bytes(v) for v in rep.view(7000, 300)] == [data[7000:7168], data[7168:7300]]
    assert b"".join(rep.view(3000, 10)) == data[3000:3010]
    with pytest.raises(ValueError, match="range 8000\\+100 outside rank 1 v10"):
        rep.view(8000, 100)
    assert store.inventory() == {1: [(10, 0)]}
    assert store.begin(meta, source=1, now=2.0) is None  # already held: no transfer


def test_corrupt_chunk_aborts_and_nothing_is_served() -> None:
    store = ReplicaStore(budget=1 << 20)
    meta, data = make_shard(2, 5, [4096, 4096])
    bad = bytearray(data)
    bad[5000] ^= 1
    rec = store.begin(meta, source=2, now=0.0)
    assert rec is not None
    store.chunk(rec.id, 0, memoryview(bytes(bad))[:4096], now=0.0)
    with pytest.raises(ChecksumMismatch, match="tensor 't1'"):
        store.chunk(rec.id, 4096, memoryview(bytes(bad))[4096:], now=0.0)
    assert store.get(2) is None and store.receptions() == []
    with pytest.raises(ProtocolError, match="no reception"):
        store.chunk(rec.id, 8192, memoryview(b"x"), now=0.0)


def test_out_of_order_chunk_aborts() -> None:
    store = ReplicaStore(budget=1 << 20)
    meta, data = make_shard(2, 5, [8192])
    rec = store.begin(meta, source=2, now=0.0)
    assert rec is not None
    with pytest.raises(ProtocolError, match="chunk at 4096, expected 0"):
        store.chunk(rec.id, 4096, memoryview(data)[4096:], now=0.0)
    assert store.receptions() == []


def test_chunks_are_kept_where_they_arrived_not_copied() -> None:
    """A large chunk (a received frame) becomes a piece of the replica as it is: its bytes
    are verified in place and served from there; small ones are copied (compact)."""
    store = ReplicaStore(budget=4 * MiB)
    meta, data = make_shard(4, 7, [MiB - 5, 1005])
    frames = [bytearray(data[:MiB]), bytearray(data[MiB:])]
    rec = store.begin(meta, source=4, now=0.0)
    assert rec is not None
    store.chunk(rec.id, 0, memoryview(frames[0]), now=0.0)
    store.chunk(rec.id, MiB, memoryview(frames[1]), now=0.0)
    rep = store.finish(rec.id, now=1.0)
    big, small = rep.pieces()
    frames[0][10] ^= 0xFF  # the replica *is* the first frame: it sees the change
    frames[1][0] ^= 0xFF  # the small piece was copied: it does not
    assert big[10] == frames[0][10] != data[10]
    assert small[0] == data[MiB] and len(small) == 1000
    assert rep.data()[MiB:] == data[MiB:]


def test_newer_version_supersedes_in_flight_and_stale_is_refused() -> None:
    store = ReplicaStore(budget=1 << 20)
    old, old_data = make_shard(3, 10, [20_000])
    new, new_data = make_shard(3, 20, [20_000])
    rec_old = store.begin(old, source=3, now=0.0)
    assert rec_old is not None
    store.chunk(rec_old.id, 0, memoryview(old_data)[:8192], now=0.0)
    rec_new = store.begin(new, source=3, now=0.0)
    assert rec_new is not None
    assert store.reception(rec_old.id) is None  # superseded
    with pytest.raises(ProtocolError):
        store.chunk(rec_old.id, 8192, memoryview(old_data)[8192:], now=0.0)
    with pytest.raises(Refused, match=r"stale: rank 3 v10 g0 is older than rank 3 v20 g0 in fl"):
        store.begin(old, source=3, now=0.0)
    store.chunk(rec_new.id, 0, memoryview(new_data), now=0.0)
    store.finish(rec_new.id, now=1.0)
    with pytest.raises(Refused, match="stale"):
        store.begin(old, source=3, now=2.0)
    # a later generation wins over any version of an older one (after a rollback)
    rolled, rolled_data = make_shard(3, 15, [20_000], generation=1)
    push(store, rolled, rolled_data)
    assert store.get(3) is not None and store.get(3).meta.order == (1, 15)  # type: ignore[union-attr]


def test_keep_last_and_budget_accounting() -> None:
    size = 64 * KiB
    store = ReplicaStore(budget=4 * size, keep_last=2)
    for v in (1, 2, 3):
        push(store, *make_shard(1, v, [size]))
    assert [r.meta.version for r in store.replicas(1)] == [3, 2]
    assert store.held_bytes <= store.budget
    push(store, *make_shard(2, 1, [size]))  # reuses rank 1 v1's buffer
    push(store, *make_shard(2, 2, [size]))
    assert store.inventory() == {1: [(3, 0), (2, 0)], 2: [(2, 0), (1, 0)]}
    assert store.held_bytes == store.budget
    # full: rank 2 v3 needs room; the oldest replica that is not its rank's newest goes
    push(store, *make_shard(2, 3, [size]))
    assert store.inventory() == {1: [(3, 0)], 2: [(3, 0), (2, 0)]}
    assert store.held_bytes <= store.budget


def test_budget_never_evicts_a_ranks_newest_replica() -> None:
    size = 64 * KiB
    store = ReplicaStore(budget=2 * size)
    push(store, *make_shard(1, 1, [size]))
    push(store, *make_shard(2, 1, [size]))
    meta, _ = make_shard(1, 2, [size])
    with pytest.raises(Refused, match=r"budget: rank 1 v2 g0 needs 65536 bytes; 0 of 131072 free"):
        store.begin(meta, source=1, now=0.0)
    assert store.inventory() == {1: [(1, 0)], 2: [(1, 0)]}  # intact
    with pytest.raises(Refused, match="too_big"):
        store.begin(make_shard(4, 1, [3 * size])[0], source=4, now=0.0)


def test_a_superseded_replicas_bytes_leave_the_budget() -> None:
    size = 256 * KiB
    store = ReplicaStore(budget=8 * size)
    push(store, *make_shard(1, 1, [size]))
    first = store.get(1)
    assert first is not None
    push(store, *make_shard(1, 2, [size]))
    assert store.held_bytes == size and first.pieces() == []  # let go of at once


def test_pinned_replica_survives_eviction_until_unpinned() -> None:
    size = 64 * KiB
    store = ReplicaStore(budget=3 * size)
    push(store, *make_shard(1, 1, [size]))
    rep = store.pin(1)
    assert rep is not None
    meta2, data2 = make_shard(1, 2, [size])
    push(store, meta2, data2)  # keep_last=1: v1 retired, but still readable while pinned
    assert bytes(rep.data()) == make_shard(1, 1, [size])[1]
    assert store.get(1, version=1) is None
    assert store.held_bytes == 2 * size
    store.unpin(rep)
    assert store.held_bytes == size and rep.pieces() == []  # v1's buffers went with the pin


def test_idle_receptions_expire() -> None:
    store = ReplicaStore(budget=1 << 20)
    meta, data = make_shard(1, 1, [10_000])
    rec = store.begin(meta, source=1, now=0.0)
    assert rec is not None
    store.chunk(rec.id, 0, memoryview(data)[:100], now=5.0)
    assert store.expire(now=10.0, idle=30.0) == []
    assert [r.id for r in store.expire(now=35.0, idle=30.0)] == [rec.id]
    assert store.receptions() == [] and store.get(1) is None


def test_bad_constructor_args() -> None:
    with pytest.raises(ValueError, match="budget = -1"):
        ReplicaStore(budget=-1)
    with pytest.raises(ValueError, match="keep_last = 0"):
        ReplicaStore(budget=1, keep_last=0)


# ---- one budget for the node's arenas and its peers' replicas ------------------------------


def test_shared_budget_counts_replicas_and_arenas_together() -> None:
    size = 64 * KiB
    shared = MemoryBudget(4 * size)
    store = ReplicaStore(budget=100 * size, shared=shared, keep_last=2)
    assert store.budget == 4 * size  # the shared limit is the tighter one
    shared.reserve(2 * size, "arena for rank 0")  # the local arenas come first
    push(store, *make_shard(1, 1, [size]))
    push(store, *make_shard(2, 1, [size]))
    assert shared.held == 4 * size and store.held_bytes == 2 * size
    meta, _ = make_shard(3, 1, [size])
    with pytest.raises(Refused, match=r"budget: rank 3 v1 g0 needs 65536 bytes; 0 of"):
        store.begin(meta, source=3, now=0.0)
    assert store.inventory() == {1: [(1, 0)], 2: [(1, 0)]}  # intact
    store.close()
    assert shared.held == 2 * size  # the arena's share stays reserved


def test_an_arena_reclaims_older_replicas_never_a_newest() -> None:
    size = 64 * KiB
    shared = MemoryBudget(5 * size)
    store = ReplicaStore(budget=5 * size, shared=shared, keep_last=2)
    push(store, *make_shard(1, 1, [size]))
    push(store, *make_shard(1, 2, [size]))
    push(store, *make_shard(2, 1, [size]))
    store.abort(store.begin(make_shard(2, 2, [size])[0], source=2, now=0.0).id)  # type: ignore[union-attr]
    assert store.held_bytes == 3 * size and shared.held == 3 * size  # an abort frees at once
    shared.reserve(3 * size, "arena for rank 0")  # takes rank 1's v1
    assert store.inventory() == {1: [(2, 0)], 2: [(1, 0)]}
    assert shared.held == 5 * size and store.held_bytes == 2 * size
    shared.release(size)
    with pytest.raises(CapacityError, match=r"arena for rank 1 needs 128\.0 KiB"):
        shared.reserve(2 * size, "arena for rank 1")  # only the newest replicas are left
    assert store.inventory() == {1: [(2, 0)], 2: [(1, 0)]}


def test_reclaiming_from_another_thread_takes_nothing() -> None:
    size = 64 * KiB
    shared = MemoryBudget(2 * size)
    store = ReplicaStore(budget=2 * size, shared=shared, keep_last=2)
    push(store, *make_shard(1, 1, [size]))
    push(store, *make_shard(1, 2, [size]))
    errors: list[BaseException] = []

    def arena() -> None:
        try:
            shared.reserve(size, "arena for rank 0")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=arena)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], CapacityError)
    assert store.inventory() == {1: [(2, 0), (1, 0)]}


# ---- protected versions (the cluster's recoverable point and its target) ----------------


def test_a_protected_replica_is_kept_until_a_newer_one_is_protected_instead() -> None:
    size = 64 * KiB
    store = ReplicaStore(budget=8 * size, keep_last=1)
    store.protect({(0, 5)})
    push(store, *make_shard(1, 5, [size]))
    push(store, *make_shard(1, 6, [size]))
    push(store, *make_shard(1, 7, [size]))  # keep_last = 1 keeps v7; v5 is protected
    assert store.inventory() == {1: [(7, 0), (5, 0)]}
    store.protect({(0, 5), (0, 8)})  # the next target: v8 is kept once it arrived
    push(store, *make_shard(1, 8, [size]))
    push(store, *make_shard(1, 9, [size]))
    assert store.inventory() == {1: [(9, 0), (8, 0), (5, 0)]}
    store.protect({(0, 8)})  # v8 became the point: v5 goes
    assert store.inventory() == {1: [(9, 0), (8, 0)]}


def test_a_protected_version_is_taken_even_when_a_newer_one_is_held() -> None:
    size = 64 * KiB
    store = ReplicaStore(budget=8 * size)
    push(store, *make_shard(1, 9, [size]))
    with pytest.raises(Refused, match="stale"):
        store.begin(make_shard(1, 8, [size])[0], source=1, now=0.0)
    store.protect({(0, 8)})
    push(store, *make_shard(1, 8, [size]))  # the owner pushes the target after a newer one
    assert store.inventory() == {1: [(9, 0), (8, 0)]}
    assert store.begin(make_shard(1, 8, [size])[0], source=1, now=0.0) is None  # held


def test_a_protected_reception_and_a_newer_one_run_side_by_side() -> None:
    size = 64 * KiB
    store = ReplicaStore(budget=8 * size)
    store.protect({(0, 8)})
    target, target_data = make_shard(1, 8, [size])
    rec = store.begin(target, source=1, now=0.0)
    assert rec is not None
    push(store, *make_shard(1, 9, [size]))  # does not supersede the target's reception
    store.chunk(rec.id, 0, memoryview(target_data), now=1.0)
    store.finish(rec.id, now=1.0)
    assert store.inventory() == {1: [(9, 0), (8, 0)]}


def test_room_is_never_made_by_evicting_a_protected_replica() -> None:
    size = 64 * KiB
    store = ReplicaStore(budget=3 * size, keep_last=2)
    store.protect({(0, 1)})
    push(store, *make_shard(1, 1, [size]))
    push(store, *make_shard(1, 2, [size]))
    push(store, *make_shard(2, 1, [size]))
    with pytest.raises(Refused, match="budget"):  # v1 of rank 1 would be the one to go
        store.begin(make_shard(2, 2, [size])[0], source=2, now=0.0)
    assert store.get(1, 1) is not None
    assert store.reclaim(size) == 0  # nor for the node's own arenas


def test_an_expired_reception_gives_its_memory_back_at_once() -> None:
    store = ReplicaStore(budget=64 * MiB)
    rec = store.begin(_meta(1, 1, 8 * MiB), source=1, now=0.0)
    assert rec is not None and store.held_bytes >= 8 * MiB
    assert [r.id for r in store.expire(now=60.0, idle=30.0)] == [rec.id]
    assert store.held_bytes == 0  # not kept for reuse: a forged announcement costs nothing


def test_an_announced_size_must_be_plausible_for_the_rank() -> None:
    cap = GROWTH * MiB + SLACK
    store = ReplicaStore(budget=4 * cap)  # four ranks held: a share of `cap` each
    for rank in (1, 2, 3, 4):
        push(store, *make_shard(rank, 1, [MiB]), chunk=MiB)
    with pytest.raises(Refused, match=r"too_big: .* announces"):
        store.begin(_meta(1, 2, cap + 1), source=1, now=0.0)
    assert store.begin(_meta(1, 2, GROWTH * MiB), source=1, now=0.0) is not None


def test_a_rank_may_grow_to_its_share_of_the_budget() -> None:
    # a first capture before the optimizer's state exists, then the full state: a rank's
    # replica may grow far beyond GROWTH x + SLACK, up to its fair share, and is never locked out
    store = ReplicaStore(budget=1 << 40)
    push(store, *make_shard(1, 1, [MiB]), chunk=MiB)
    push(store, *make_shard(2, 1, [MiB]), chunk=MiB)
    big = GROWTH * MiB + SLACK + 1
    assert store.begin(_meta(1, 2, big), source=1, now=0.0) is not None
    with pytest.raises(Refused, match=r"too_big: .* share of the budget, 549755813888"):
        store.begin(_meta(2, 2, (1 << 39) + 1), source=2, now=0.0)


def test_the_nodes_own_arenas_reclaim_a_push_in_flight() -> None:
    shared = MemoryBudget(32 * MiB)
    store = ReplicaStore(32 * MiB, shared=shared)
    rec = store.begin(_meta(1, 1, 30 * MiB), source=1, now=0.0)  # announced at the budget
    assert rec is not None
    shared.reserve(16 * MiB, "arena rank 0")  # the worker's arena still fits
    assert store.reception(rec.id) is None and store.held_bytes == 0


def test_memory_a_push_lost_or_reclaimed_goes_back_to_the_system_a_superseded_one_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """malloc keeps a superseded replica's buffers for the next version (no page faults); a
    reception whose sender was lost, or what the node's arenas reclaim, is trimmed at once."""
    trims: list[int] = []
    monkeypatch.setattr(
        "supervise.cluster.replica_store.give_back_free_memory", lambda: trims.append(1)
    )
    size = 64 * KiB
    shared = MemoryBudget(3 * size)
    store = ReplicaStore(budget=3 * size, shared=shared, keep_last=2)
    for v in (1, 2, 3):
        push(store, *make_shard(1, v, [size]))
    assert trims == []  # v1 superseded: its buffers wait in malloc's arena for the next one
    rec = store.begin(make_shard(2, 1, [size])[0], source=2, now=0.0)
    assert rec is not None
    assert store.release(rec.id) == size and trims == [1]
    shared.reserve(2 * size, "arena for rank 0")  # reclaims rank 1's v2
    assert store.inventory() == {1: [(3, 0)]} and trims == [1, 1]
