"""The interface every backend implements: KV with revisions, transactions, leases, watches.

Both backends (embedded, etcd) give the same answers to the same calls; the higher-level parts
(resumable watches, lease keep-alive, election with fencing) are built on this and nothing else,
so they behave alike on both.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager

from supervise.store.records import (
    Compare,
    Delete,
    Event,
    Op,
    Put,
    Record,
    Snapshot,
    TxnResult,
)


class Store(abc.ABC):
    """A coordination store. Every call may raise `StoreUnavailable` (back off, retry)."""

    @abc.abstractmethod
    async def range(self, key: str, *, prefix: bool = False) -> Snapshot:
        """``key``'s record (or every record under the prefix ``key``), with the revision read."""

    async def get(self, key: str) -> Record | None:
        """``key``'s record, None when it does not exist."""
        snap = await self.range(key)
        return snap.records[0] if snap.records else None

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Set ``key``; the store revision of the change."""
        return (await self.txn((), (Put(key, value, lease),))).revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or the prefix); the store revision after it."""
        return (await self.txn((), (Delete(key, prefix),))).revision

    @abc.abstractmethod
    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Atomically: if every guard in ``compare`` holds run ``success``, else ``failure``."""

    @abc.abstractmethod
    async def grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; its id (keys put with it die with it)."""

    @abc.abstractmethod
    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL in seconds, 0 when it no longer exists."""

    @abc.abstractmethod
    async def revoke(self, lease: int) -> None:
        """End ``lease`` now, deleting its keys (no error if it is already gone)."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Forget history before ``revision`` (watches from older revisions get `Compacted`)."""

    @abc.abstractmethod
    def watch(
        self, key: str, *, prefix: bool = False, start_revision: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[tuple[Event, ...]]]:
        """Changes to ``key`` (or the prefix) from ``start_revision`` (0: from now), in batches.

        ``async with store.watch(...) as batches: async for events in batches: ...``. Raises
        `Compacted` (on entering or while iterating) if ``start_revision`` is compacted away.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections (the embedded store keeps its data)."""


def prefix_end(key: bytes) -> bytes:
    """The first key after every key starting with ``key`` (etcd's ``range_end`` of a prefix)."""
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def under(record_key: str, key: str, prefix: bool) -> bool:
    """Whether ``record_key`` is ``key``, or starts with it when ``prefix``."""
    return record_key.startswith(key) if prefix else record_key == key
