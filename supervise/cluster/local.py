"""The node's own shards, as the replication service sees them.

:class:`LocalShards` is the seam to the snapshot package: the agent adapts its ArenaService
(committed slots of the local workers) to it; :class:`MemoryShards` is a plain in-RAM
implementation for tests, benchmarks and tools.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from supervise.cluster.shard import ShardMeta


class LocalShards(Protocol):
    """Read the committed local shards; take in a shard fetched from a peer."""

    def ranks(self) -> Sequence[int]:
        """The global ranks whose shards this node owns (its local workers)."""
        ...

    def latest(self, rank: int) -> ShardMeta | None:
        """The newest committed shard of ``rank`` on this node."""
        ...

    def meta(self, rank: int, version: int) -> ShardMeta | None:
        """The committed shard of ``rank`` at ``version`` on this node, if held."""
        ...

    def open(self, rank: int, version: int) -> AbstractContextManager[memoryview]:
        """The data region of a committed shard, readable for the block (LookupError if gone).

        The memory stays put until the block exits (the arena service pins its slot; a capture
        meanwhile takes another); the receiver's checksums still catch any torn bytes.
        """
        ...

    def ingest(self, meta: ShardMeta) -> AbstractContextManager[memoryview]:
        """A writable destination for ``meta``'s data region; committed when the block exits
        normally (the bytes were verified by then), discarded when it raises.
        """
        ...


class MemoryShards:
    """Local shards kept in process memory: ``keep`` newest versions per rank."""

    def __init__(self, ranks: Sequence[int], *, keep: int = 2) -> None:
        self._ranks = list(ranks)
        self._keep = keep
        self._shards: dict[int, list[tuple[ShardMeta, bytearray]]] = {r: [] for r in ranks}

    def ranks(self) -> Sequence[int]:
        return list(self._ranks)

    def commit(self, meta: ShardMeta, data: bytes | bytearray | memoryview) -> None:
        """Record a committed shard (newest first; older ones beyond ``keep`` are dropped)."""
        if meta.rank not in self._shards:
            raise LookupError(f"rank {meta.rank} is not local to this node")
        if len(data) != meta.nbytes:
            raise ValueError(f"{meta.label}: {len(data)} bytes, the manifest says {meta.nbytes}")
        self._hold(meta, bytearray(data))

    def _hold(self, meta: ShardMeta, data: bytearray) -> None:
        held = [s for s in self._shards[meta.rank] if s[0].version != meta.version]
        held.append((meta, data))
        held.sort(key=lambda s: s[0].order, reverse=True)
        self._shards[meta.rank] = held[: self._keep]

    def latest(self, rank: int) -> ShardMeta | None:
        held = self._shards.get(rank)
        return held[0][0] if held else None

    def meta(self, rank: int, version: int) -> ShardMeta | None:
        found = self.get(rank, version)
        return None if found is None else found[0]

    def get(self, rank: int, version: int | None = None) -> tuple[ShardMeta, bytearray] | None:
        for meta, data in self._shards.get(rank, ()):
            if version is None or meta.version == version:
                return meta, data
        return None

    @contextmanager
    def open(self, rank: int, version: int) -> Iterator[memoryview]:
        found = self.get(rank, version)
        if found is None:
            raise LookupError(f"rank {rank} v{version} is not committed on this node")
        with memoryview(found[1]) as view:
            yield view

    @contextmanager
    def ingest(self, meta: ShardMeta) -> Iterator[memoryview]:
        if meta.rank not in self._shards:
            raise LookupError(f"rank {meta.rank} is not local to this node")
        buf = bytearray(meta.nbytes)
        with memoryview(buf) as view:
            yield view
        self._hold(meta, buf)  # verified in place: kept as is, no second copy
