"""The node's own shards for replication: the snapshot package's ArenaService seen through the
cluster package's `LocalShards` seam (committed slots to push, fetched shards to ingest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from supervise.cluster.shard import Check, ShardMeta
from supervise.snapshot.errors import SnapshotError
from supervise.snapshot.manifest import Manifest
from supervise.snapshot.service import ArenaService
from supervise.telemetry import Source


def shard_meta(manifest: Manifest, raw: bytes | None = None) -> ShardMeta:
    """The data plane's view of a manifest: identity, size and per-tensor checksums."""
    checks = [Check(t.name, t.offset, t.nbytes, t.digest) for t in manifest.tensors]
    return ShardMeta(
        manifest.rank,
        manifest.step,
        manifest.generation,
        manifest.nbytes,
        checks,
        manifest.to_bytes() if raw is None else raw,
        manifest.checksum,
    )


class ArenaShards:
    """`LocalShards` over an `ArenaService`: the ranks are this node's workers."""

    def __init__(self, service: ArenaService, ranks: Sequence[int]) -> None:
        self._service = service
        self._ranks = list(ranks)

    def ranks(self) -> Sequence[int]:
        return list(self._ranks)

    def latest(self, rank: int) -> ShardMeta | None:
        held = self._service.versions(rank)
        if not held:
            return None
        newest = max(held, key=lambda v: (v.generation, v.step))
        with self._service.shard(rank, newest.step) as shard:
            return shard_meta(shard.manifest, shard.raw)

    def meta(self, rank: int, version: int) -> ShardMeta | None:
        try:
            with self._service.shard(rank, version) as shard:
                return shard_meta(shard.manifest, shard.raw)
        except SnapshotError:
            return None

    @contextlib.contextmanager
    def open(self, rank: int, version: int) -> Iterator[memoryview]:
        with contextlib.ExitStack() as stack:
            try:
                shard = stack.enter_context(self._service.shard(rank, version))
            except SnapshotError as exc:
                raise LookupError(f"rank {rank} v{version} is not committed here") from exc
            yield shard.data

    @contextlib.contextmanager
    def ingest(self, meta: ShardMeta) -> Iterator[memoryview]:
        if meta.rank not in self._ranks:
            raise LookupError(f"rank {meta.rank} is not local to this node")
        manifest = Manifest.from_bytes(meta.manifest)
        with self._service.ingesting(meta.rank, manifest, source=Source.PEER.value) as view:
            yield view
