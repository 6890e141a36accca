"""Leader election with fencing, built on a transaction and a lease (no server-side election
API): the leader is whoever created the election key; its create revision names the term, and
every write of the leader is a transaction guarded by "the key still exists at that revision".

The key is attached to the candidate's lease, so a leader that dies, freezes or is cut off
loses the key when its lease expires; the next candidate's create gets a higher revision, and
any write the old leader still attempts is refused by the store (`FencedWriteRefused`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import structlog

from supervise.store.base import Store
from supervise.store.errors import Compacted, FencedWriteRefused
from supervise.store.records import (
    Compare,
    Delete,
    EventKind,
    Get,
    Op,
    Put,
    Record,
    TxnResult,
    created_at,
    missing,
)

log = structlog.get_logger("supervise.store")


@attrs.frozen(slots=True)
class Leadership:
    """A won election: the leader key, the revision that created it (the fence), the lease."""

    key: str
    revision: int
    lease: int
    value: bytes

    def fence(self) -> Compare:
        """The guard every write of this leader carries."""
        return created_at(self.key, self.revision)


class Election:
    """One election (one key). ``campaign`` waits to win; ``write`` is a fenced transaction."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.key = key

    async def leader(self) -> Record | None:
        """The current leader's record (its value says who), None when there is none."""
        return await self.store.get(self.key)

    async def campaign(self, lease: int, value: bytes) -> Leadership:
        """Wait until this candidate leads; ``value`` (who it is) becomes the key's value.

        A candidate that already holds the key with the same lease (it campaigned before,
        e.g. after a restart of its task) gets its existing leadership back.
        """
        while True:
            result = await self.store.txn(
                (missing(self.key),), (Put(self.key, value, lease),), (Get(self.key),)
            )
            if result.succeeded:
                won = Leadership(self.key, result.revision, lease, value)
                log.info("store_elected", key=self.key, revision=won.revision, lease=f"{lease:x}")
                return won
            current = result.reads[0][0] if result.reads and result.reads[0] else None
            if current is None:
                continue  # deleted in between: try again
            if current.lease == lease:
                return Leadership(self.key, current.create_revision, lease, current.value)
            await self._wait_deleted(result.revision)

    async def _wait_deleted(self, seen: int) -> None:
        """Return once the key is deleted after revision ``seen`` (or history is compacted)."""
        try:
            async with self.store.watch(self.key, start_revision=seen + 1) as batches:
                async for batch in batches:
                    if any(event.kind is EventKind.DELETE for event in batch):
                        return
        except Compacted:
            return  # the caller re-reads the key

    async def write(
        self, leadership: Leadership, ops: Sequence[Op], *, guards: Sequence[Compare] = ()
    ) -> TxnResult:
        """Run ``ops`` only while ``leadership`` holds (and ``guards`` hold).

        Raises `FencedWriteRefused` when the leadership is gone; returns the result (with
        ``succeeded`` False) when only ``guards`` failed.
        """
        result = await self.store.txn((leadership.fence(), *guards), tuple(ops), (Get(self.key),))
        if result.succeeded:
            return result
        current = result.reads[0][0] if result.reads and result.reads[0] else None
        if current is None or current.create_revision != leadership.revision:
            log.warning(
                "store_fenced_write_refused",
                key=self.key,
                revision=leadership.revision,
                current=None if current is None else current.create_revision,
            )
            raise FencedWriteRefused(self.key, leadership.revision)
        return result

    async def resign(self, leadership: Leadership) -> bool:
        """Give the leadership up (delete the key if it is still ours); whether it was."""
        result = await self.store.txn((leadership.fence(),), (Delete(self.key),))
        return result.succeeded
