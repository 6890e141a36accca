"""The embedded store: an in-process store with etcd's semantics, for one node and for tests.

Same revisions, transactions, leases (on trio's clock: virtual time in tests) and watches as the
etcd backend, but it lives in one process's memory: no quorum, no durability, nothing shared
between machines. Leases expire lazily, when any call or waiting watch looks at the clock.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from supervise._validation import InvalidValue
from supervise.store.base import Store, under
from supervise.store.errors import Code, Compacted, StoreRejected
from supervise.store.records import (
    Compare,
    Delete,
    Event,
    EventKind,
    Get,
    Op,
    Put,
    Record,
    Snapshot,
    TxnResult,
)


@attrs.define
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = attrs.Factory(set)


class EmbeddedStore(Store):
    """An in-memory store; every task of the process that holds it sees the same data."""

    def __init__(self) -> None:
        self._revision = 1  # etcd starts at 1 with an empty keyspace
        self._compacted = 0
        self._kv: dict[str, Record] = {}
        self._history: list[Event] = []
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 0x5E0000
        self._changed = trio.Event()

    @property
    def revision(self) -> int:
        """The current store revision."""
        return self._revision

    # -- the interface ---------------------------------------------------------------------

    async def range(self, key: str, *, prefix: bool = False) -> Snapshot:
        await trio.lowlevel.checkpoint()
        self._expire()
        return Snapshot(self._read(key, prefix), self._revision)

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        await trio.lowlevel.checkpoint()
        self._expire()
        succeeded = all(c.holds(self._kv.get(c.key)) for c in compare)
        ops = tuple(success if succeeded else failure)
        for op in ops:  # check before changing anything: a transaction is all or nothing
            if isinstance(op, Put) and op.lease and op.lease not in self._leases:
                raise StoreRejected("txn", Code.NOT_FOUND, "requested lease not found")
        revision = self._revision + 1
        events: list[Event] = []
        reads: list[tuple[Record, ...]] = []
        for op in ops:
            if isinstance(op, Get):
                reads.append(self._read(op.key, op.prefix))
                continue
            reads.append(())
            if isinstance(op, Put):
                events.append(self._put(op, revision))
            else:
                events.extend(self._delete(op, revision))
        self._commit(events)
        return TxnResult(succeeded, self._revision, tuple(reads))

    async def grant(self, ttl_s: int) -> int:
        await trio.lowlevel.checkpoint()
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise InvalidValue("ttl_s", ttl_s, "must be an integer >= 1 (seconds)")
        self._expire()
        self._next_lease += 1
        self._leases[self._next_lease] = _Lease(ttl_s, trio.current_time() + ttl_s)
        return self._next_lease

    async def keepalive(self, lease: int) -> int:
        await trio.lowlevel.checkpoint()
        self._expire()
        held = self._leases.get(lease)
        if held is None:
            return 0
        held.deadline = trio.current_time() + held.ttl
        return held.ttl

    async def revoke(self, lease: int) -> None:
        await trio.lowlevel.checkpoint()
        self._expire()
        self._end_lease(lease)

    async def compact(self, revision: int) -> None:
        await trio.lowlevel.checkpoint()
        if revision > self._revision:
            raise StoreRejected(
                "compact",
                Code.OUT_OF_RANGE,
                f"revision {revision} is a future revision ({self._revision})",
            )
        if revision <= self._compacted:
            raise StoreRejected(
                "compact", Code.OUT_OF_RANGE, "required revision has been compacted"
            )
        self._compacted = revision
        cut = bisect.bisect_left(self._history, revision, key=lambda e: e.revision)
        del self._history[:cut]

    @asynccontextmanager
    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int = 0
    ) -> AsyncIterator[AsyncIterator[tuple[Event, ...]]]:
        await trio.lowlevel.checkpoint()
        self._expire()
        start = start_revision or self._revision + 1
        self._check_compacted(start)
        events = self._events(key, prefix, start)
        try:
            yield events
        finally:
            await events.aclose()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    # -- internals -------------------------------------------------------------------------

    async def _events(
        self, key: str, prefix: bool, start: int
    ) -> AsyncGenerator[tuple[Event, ...], None]:
        next_revision = start
        while True:
            self._expire()
            self._check_compacted(next_revision)
            first = bisect.bisect_left(self._history, next_revision, key=lambda e: e.revision)
            batch = tuple(e for e in self._history[first:] if under(e.record.key, key, prefix))
            next_revision = self._revision + 1
            if batch:
                yield batch
                continue
            changed = self._changed
            with trio.move_on_at(self._next_deadline()):
                await changed.wait()

    def _check_compacted(self, start: int) -> None:
        if start < self._compacted:
            raise Compacted(start, self._compacted)

    def _read(self, key: str, prefix: bool) -> tuple[Record, ...]:
        if not prefix:
            record = self._kv.get(key)
            return () if record is None else (record,)
        found = (r for k, r in self._kv.items() if under(k, key, prefix))
        return tuple(sorted(found, key=lambda r: r.key.encode()))

    def _put(self, op: Put, revision: int) -> Event:
        old = self._kv.get(op.key)
        if old is not None and old.lease and old.lease in self._leases:
            self._leases[old.lease].keys.discard(op.key)
        record = Record(
            op.key,
            op.value,
            create_revision=revision if old is None else old.create_revision,
            mod_revision=revision,
            version=1 if old is None else old.version + 1,
            lease=op.lease,
        )
        self._kv[op.key] = record
        if op.lease:
            self._leases[op.lease].keys.add(op.key)
        return Event(EventKind.PUT, record)

    def _delete(self, op: Delete, revision: int) -> list[Event]:
        events = []
        for record in self._read(op.key, op.prefix):
            del self._kv[record.key]
            if record.lease in self._leases:
                self._leases[record.lease].keys.discard(record.key)
            events.append(Event(EventKind.DELETE, Record(record.key, mod_revision=revision)))
        return events

    def _commit(self, events: list[Event]) -> None:
        if not events:
            return  # nothing changed: the revision stays (as etcd's)
        self._revision += 1
        self._history.extend(events)
        self._changed.set()
        self._changed = trio.Event()

    def _end_lease(self, lease: int) -> None:
        held = self._leases.pop(lease, None)
        if held is None or not held.keys:
            return
        revision = self._revision + 1
        events = [self._delete(Delete(key), revision)[0] for key in sorted(held.keys)]
        self._commit(events)

    def _expire(self) -> None:
        now = trio.current_time()
        for lease in [i for i, held in self._leases.items() if held.deadline <= now]:
            self._end_lease(lease)

    def _next_deadline(self) -> float:
        return min((held.deadline for held in self._leases.values()), default=math.inf)
