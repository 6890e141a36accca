"""xxhash64 checksums of a shard's tensors (computed off the training thread; the hashing
releases the GIL, so several threads hash in parallel)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import xxhash

from supervise.snapshot.manifest import Manifest, TensorEntry


def xxh64(data: bytes | memoryview) -> int:
    """xxhash64 (seed 0) of a buffer."""
    return int(xxhash.xxh64_intdigest(data))


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


def digests(entries: Sequence[TensorEntry], data: memoryview, *, threads: int = 1) -> list[int]:
    """The xxhash64 of each entry's bytes in ``data``, in entry order."""
    out = [0] * len(entries)

    def run(indices: list[int]) -> None:
        for i in indices:
            e = entries[i]
            out[i] = xxh64(data[e.offset : e.offset + e.nbytes])

    groups = split_balanced([e.nbytes for e in entries], threads)
    if len(groups) <= 1:
        for g in groups:
            run(g)
        return out
    with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="supervise-xxh") as pool:
        for f in [pool.submit(run, g) for g in groups]:
            f.result()
    return out


def mismatches(manifest: Manifest, data: memoryview, *, threads: int = 1) -> list[str]:
    """Names of the tensors whose bytes in ``data`` do not match the manifest's checksums."""
    if len(data) < manifest.nbytes:
        return [t.name for t in manifest.tensors]
    got = digests(manifest.tensors, data, threads=threads)
    return [t.name for t, h in zip(manifest.tensors, got, strict=True) if t.xxh64 != h]
