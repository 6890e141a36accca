"""Checksum cost per GiB, XXH3-64 vs xxhash64 (the manifest format before it), side by side.

Per algorithm, interleaved, best of ``--repeat`` (the least disturbed run on a shared
machine), in CPU seconds of this thread (``time.thread_time``, steadier than wall time under
load) and wall seconds:

- hash: one pass over 1 GiB held in 64 tensors (what a capture computes after its copy);
- verify + copy: `StreamVerifier.feed_into` in 8 MiB chunks into a preallocated, touched
  buffer (what a replica holder does on receipt, and a fetch);
- memcpy alone into the same buffer (the floor of verify + copy).

    python benchmarks/checksum.py [--gib 1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from supervise.cluster.shard import Check, ShardMeta, StreamVerifier
from supervise.snapshot.hashing import Checksum, digest

GiB = 1 << 30
CHUNK = 8 << 20


def timed(fn: object) -> tuple[float, float]:
    c, t = time.thread_time(), time.perf_counter()
    fn()  # type: ignore[operator]
    return time.thread_time() - c, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = int(args.gib * GiB)
    src = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
    dst = np.ones(n, dtype=np.uint8)
    sv, dv = memoryview(src), memoryview(dst)
    step = n // 64
    ranges = [(i * step, n if i == 63 else (i + 1) * step) for i in range(64)]
    metas = {
        kind: ShardMeta(
            0,
            1,
            0,
            n,
            [
                Check(f"t{i}", lo, hi - lo, digest(sv[lo:hi], kind))
                for i, (lo, hi) in enumerate(ranges)
            ],
            b"",
            kind,
        )
        for kind in Checksum
    }
    cases = {}
    for kind in Checksum:

        def hash_all(kind: Checksum = kind) -> None:
            for lo, hi in ranges:
                digest(sv[lo:hi], kind)

        def verify_copy(kind: Checksum = kind) -> None:
            v = StreamVerifier.for_shard(metas[kind])
            for off in range(0, n, CHUNK):
                v.feed_into(sv[off : off + CHUNK], dv[off : off + CHUNK])
            assert v.complete

        cases[f"hash, {kind.value}"] = hash_all
        cases[f"verify + copy, {kind.value}"] = verify_copy

    def memcpy() -> None:
        np.copyto(dst, src)

    cases["memcpy alone"] = memcpy
    best = {k: (float("inf"), float("inf")) for k in cases}
    for _ in range(args.repeat):
        for k, fn in cases.items():
            c, w = timed(fn)
            best[k] = (min(best[k][0], c), min(best[k][1], w))
    print(f"load average {os.getloadavg()[0]:.1f}; {args.gib:g} GiB, best of {args.repeat}")
    print("| what | CPU s per GiB | wall s per GiB |")
    print("| --- | ---: | ---: |")
    for k, (c, w) in best.items():
        print(f"| {k} | {c / args.gib:.3f} | {w / args.gib:.3f} |")


if __name__ == "__main__":
    main()
