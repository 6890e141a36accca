"""Per-tensor checksums of a shard (XXH3-64 for new shards, the manifest names its algorithm;
computed off the training thread; the hashing releases the GIL, so several threads hash in
parallel)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from supervise.snapshot.hashing import DEFAULT_CHECKSUM, Checksum, digest
from supervise.snapshot.manifest import Manifest, TensorEntry


def split_balanced(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``sizes`` split into at most ``parts`` groups of similar total size."""
    parts = max(1, min(parts, len(sizes)))
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        j = loads.index(min(loads))
        groups[j].append(i)
        loads[j] += sizes[i]
    return [g for g in groups if g]


def digests(
    entries: Sequence[TensorEntry],
    data: memoryview,
    *,
    threads: int = 1,
    kind: Checksum = DEFAULT_CHECKSUM,
) -> list[int]:
    """The ``kind`` checksum of each entry's bytes in ``data``, in entry order."""
    out = [0] * len(entries)

    def run(indices: list[int]) -> None:
        for i in indices:
            e = entries[i]
            out[i] = digest(data[e.offset : e.offset + e.nbytes], kind)

    groups = split_balanced([e.nbytes for e in entries], threads)
    if len(groups) <= 1:
        for g in groups:
            run(g)
        return out
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="supervise-hash") as pool:
        for f in [pool.submit(run, g) for g in groups]:
            f.result()
    return out


def mismatches(manifest: Manifest, data: memoryview, *, threads: int = 1) -> list[str]:
    """Names of the tensors whose bytes in ``data`` do not match the manifest's checksums."""
    if len(data) < manifest.nbytes:
        return [t.name for t in manifest.tensors]
    got = digests(manifest.tensors, data, threads=threads, kind=manifest.checksum)
    return [t.name for t, h in zip(manifest.tensors, got, strict=True) if t.digest != h]
