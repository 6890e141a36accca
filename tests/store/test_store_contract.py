"""The store's contract, run on both backends (embedded in virtual time, a real etcd):
compare-and-swap, leases, keep-alive loss, watches that survive compaction, election fencing."""

from __future__ import annotations

import pytest
import structlog
import trio
import trio.testing

from supervise._testing.poll import wait_until_async
from supervise.store import (
    Election,
    EventKind,
    FencedWriteRefused,
    Follow,
    Get,
    LeaseLost,
    Put,
    Resync,
    Store,
    keep_alive,
    missing,
    modified_at,
)

TTL = 2  # seconds: short, with room for a loaded machine (renewals every TTL / 3)
WAIT = 15.0  # seconds any wait may take on a loaded machine before the test fails


async def test_compare_and_swap(
    store: Store, prefix: str, clock: trio.testing.MockClock | None
) -> None:
    key = prefix + "gen"
    created = await store.txn((missing(key),), (Put(key, b"1"),))
    assert created.succeeded
    again = await store.txn((missing(key),), (Put(key, b"x"),), (Get(key),))
    assert not again.succeeded
    assert again.reads[0][0].value == b"1"  # the failure branch read the winner's value
    record = await store.get(key)
    assert record is not None
    assert (record.value, record.version, record.create_revision) == (b"1", 1, created.revision)
    swapped = await store.txn((modified_at(key, record.mod_revision),), (Put(key, b"2"),))
    assert swapped.succeeded
    stale = await store.txn((modified_at(key, record.mod_revision),), (Put(key, b"3"),))
    assert not stale.succeeded  # a compare-and-swap on an old revision loses
    record2 = await store.get(key)
    assert record2 is not None
    assert (record2.value, record2.version) == (b"2", 2)
    assert record2.create_revision == record.create_revision
    assert record2.mod_revision == swapped.revision
    await store.put(prefix + "a", b"A")
    snap = await store.range(prefix, prefix=True)
    assert [r.key for r in snap.records] == [prefix + "a", key]
    assert snap.revision >= record2.mod_revision
    await store.delete(prefix, prefix=True)
    assert (await store.range(prefix, prefix=True)).records == ()


async def test_lease_expiry_drops_keys(
    store: Store, prefix: str, clock: trio.testing.MockClock | None
) -> None:
    lease = await store.grant(TTL)
    await store.put(prefix + "member", b"me", lease=lease)
    assert await store.keepalive(lease) >= TTL
    record = await store.get(prefix + "member")
    assert record is not None and record.lease == lease

    async def gone() -> bool:
        return await store.get(prefix + "member") is None

    await wait_until_async(gone, what="the leased key to go", timeout_s=WAIT, interval_s=0.2)
    assert await store.keepalive(lease) == 0  # the lease itself is gone too


async def test_keepalive_loss_is_reported(
    store: Store, prefix: str, clock: trio.testing.MockClock | None
) -> None:
    lease = await store.grant(TTL)
    await store.put(prefix + "member", b"me", lease=lease)
    with structlog.testing.capture_logs() as logs, trio.fail_after(WAIT):
        with pytest.RaisesGroup(LeaseLost) as caught:
            async with trio.open_nursery() as nursery:
                await nursery.start(keep_alive, store, lease, TTL)
                await trio.sleep(TTL + 1)  # renewals keep it alive past its TTL
                assert await store.get(prefix + "member") is not None
                await store.revoke(lease)  # taken from under its holder
                await trio.sleep_forever()
    assert caught.value.exceptions[0].lease == lease
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["store_lease_lost"]


async def test_watch_resumes_after_compaction(
    store: Store, prefix: str, clock: trio.testing.MockClock | None
) -> None:
    first = await store.put(prefix + "a", b"1")
    await store.put(prefix + "b", b"2")
    await store.delete(prefix + "a")
    async with Follow(store, prefix, start_revision=first) as changes:  # history intact
        events = []
        with trio.fail_after(WAIT):
            while len(events) < 3:
                change = await anext(changes)
                assert not isinstance(change, Resync)
                events.extend(change)
    assert [(e.kind, e.record.key) for e in events] == [
        (EventKind.PUT, prefix + "a"),
        (EventKind.PUT, prefix + "b"),
        (EventKind.DELETE, prefix + "a"),
    ]
    now = await store.put(prefix + "c", b"3")
    await store.compact(now)
    async with Follow(store, prefix, start_revision=first) as changes:
        with trio.fail_after(WAIT):
            resync = await anext(changes)
            assert isinstance(resync, Resync)  # the old history is gone: the state instead
            assert {r.key: r.value for r in resync.snapshot.records} == {
                prefix + "b": b"2",
                prefix + "c": b"3",
            }
            later = await store.put(prefix + "d", b"4")
            batch = await anext(changes)  # and then it goes on from there
    assert not isinstance(batch, Resync)
    assert [(e.kind, e.record.key, e.revision) for e in batch] == [
        (EventKind.PUT, prefix + "d", later)
    ]


async def test_election_fences_a_deposed_leader(
    store: Store, prefix: str, clock: trio.testing.MockClock | None
) -> None:
    election = Election(store, prefix + "leader")
    old_lease = await store.grant(TTL)
    old = await election.campaign(old_lease, b"node-0")
    decision = prefix + "decision"
    await election.write(old, (Put(decision, b"gen 1"),))
    new_lease = await store.grant(TTL)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_alive, store, new_lease, TTL)
            # node-0 stops renewing (frozen, cut off): node-1 wins once its lease expires
            new = await election.campaign(new_lease, b"node-1")
            assert new.revision > old.revision
            leader = await election.leader()
            assert leader is not None and leader.value == b"node-1"
            with pytest.raises(FencedWriteRefused):
                await election.write(old, (Put(decision, b"gen 2 from node-0"),))
            await election.write(new, (Put(decision, b"gen 2"),))
            record = await store.get(decision)
            assert record is not None and record.value == b"gen 2"
            assert await election.resign(new)
            assert await election.leader() is None
            nursery.cancel_scope.cancel()
