"""Replication throughput vs raw pyzmq vs memcpy, and fetch time, in one run (loopback).

What runs, side by side and interleaved (every repetition runs every case once, so a change
of load on the shared machine hits all cases alike; ratios are taken within a repetition):

- memcpy: copy the snapshot into a preallocated, already-touched buffer (numpy);
- raw pyzmq: the same bytes in messages of the same size (copy=False) from this process to 1
  or 2 sink processes that receive and drop them; no protocol, no acks, no checksums. Also
  to a sink with the allocator setting the holders use (``keep_receive_buffers``), and the
  cost of the guarantees without any protocol: a sink that hashes (XXH3-64) each message in
  libzmq's buffer, one that receives each into its place in a buffer (``recv_into``, a
  256 MiB ring mapped like the holders' buffers) and hashes it there, and one that hashes each
  in libzmq's buffer and copies it into the ring block by block (what fetch does);
- replication: ``push_shard`` to 1 or 2 holder processes (``ReplicaEndpoint`` +
  ``ReplicaStore``): chunks with credits and acks, each verified (XXH3-64 per tensor) in
  libzmq's buffer, which the holder keeps as the replica. The very first push maps fresh
  memory (reported once); every repetition after that is the steady state;
- fetch: ``fetch_shard`` from a holder into a preallocated buffer and into fresh memory,
  verified.

Usage: ``python benchmarks/replication.py [--gib 2] [--chunk-mib 8] [--window 8] [--repeat 5]``
writes the "## Replication" section of benchmarks/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zmq

MiB = 1 << 20
GiB = 1 << 30
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
SECTION = "## Replication (`benchmarks/replication.py`)"
DEFAULT_CHUNK_MIB = 8  # = ReplicationTuning's defaults
DEFAULT_WINDOW = 8
HASH_BLOCK = 1 << 20  # = supervise.cluster.shard.HASH_BLOCK


def quiet_logs() -> None:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))


# ---- child processes -------------------------------------------------------------------


def run_sink(port: int, tuned: bool, nbytes: int) -> None:
    """Raw pyzmq: per round, receive messages (copy=False) and drop them, or hash each in
    libzmq's buffer (mode ``hash``), or (tuned sink only) receive each into the next place of
    a ring buffer and hash it there (mode ``verify``), or hash each in libzmq's buffer and copy
    it into the ring block by block (mode ``hashcopy``), or hash each in libzmq's buffer and
    keep it, the round's messages held until the end of the next round (mode ``keep``: what a
    replica holder does, its memory included); ack when done.
    """
    chunk_max = 64 * MiB
    if tuned:
        quiet_logs()
        from supervise.cluster._malloc import keep_receive_buffers

        keep_receive_buffers()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    view = memoryview(b"")
    if tuned:  # a ring the size of a few windows, mapped like the holders' buffers
        from supervise.cluster._buffers import Slab

        ring = Slab(min(nbytes, 256 * MiB))
        np.frombuffer(ring.view, dtype=np.uint8)[:: mmap.PAGESIZE] = 1  # touched: recycled
        view = ring.view
    print("READY", flush=True)
    kept: list[zmq.Frame] = []  # the last round's messages (mode keep)
    while True:
        parts = sock.recv_multipart(copy=False)
        ident, head = parts[0], parts[1].bytes
        if head == b"quit":
            break
        total, mode = int(parts[2].bytes), parts[3].bytes
        got = pos = 0
        keeping: list[zmq.Frame] = []
        while got < total:
            if mode == b"verify":
                sock.recv(copy=False)  # routing id
                sock.recv(copy=False)  # header
                pos = 0 if pos + chunk_max > len(view) else pos
                n = sock.recv_into(view[pos : pos + chunk_max])
                xxhash.xxh3_64_intdigest(view[pos : pos + n])
                got += n
                pos += n
            elif mode == b"hashcopy":
                frame = sock.recv_multipart(copy=False)[2]
                data, n = frame.buffer, len(frame)
                pos = 0 if pos + n > len(view) else pos
                h = xxhash.xxh3_64()
                for lo in range(0, n, HASH_BLOCK):
                    piece = data[lo : lo + HASH_BLOCK]
                    h.update(piece)
                    view[pos + lo : pos + lo + len(piece)] = piece
                h.intdigest()
                got += n
                pos += n
            elif mode == b"keep":  # checksum libzmq's buffer in place and keep it
                frame = sock.recv_multipart(copy=False)[2]
                xxhash.xxh3_64_intdigest(frame.buffer)
                keeping.append(frame)
                got += len(frame)
            elif mode == b"hash":  # checksum libzmq's buffer in place: no copy at all
                frame = sock.recv_multipart(copy=False)[2]
                xxhash.xxh3_64_intdigest(frame.buffer)
                got += len(frame)
            else:
                got += len(sock.recv_multipart(copy=False)[2])
        kept[:] = keeping  # the round before goes (a holder's superseded version)
        sock.send_multipart([ident.bytes, b"done"])


def run_holder(rank: int, port: int, budget: int) -> None:
    """A replica holder: transport + ReplicaEndpoint, nothing else."""
    import trio

    from supervise.cluster import Transport, TransportLimits
    from supervise.cluster.replica_store import ReplicaStore
    from supervise.cluster.replication import ReplicaEndpoint

    async def main() -> None:
        t = Transport(
            rank=rank, endpoint=f"127.0.0.1:{port}", limits=TransportLimits(max_frame_size=64 * MiB)
        )
        ReplicaEndpoint(t, ReplicaStore(budget=budget, keep_last=1)).install()
        async with t.running():
            print("READY", flush=True)
            await trio.sleep_forever()

    quiet_logs()
    trio.run(main)


# ---- helpers ---------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "READY" not in line:
        proc.kill()
        raise RuntimeError(f"child {args} did not start: {line!r}")
    return proc, port


def make_snapshot(nbytes: int, tensors: int = 64) -> tuple[Any, np.ndarray]:
    """A snapshot-like shard: ``tensors`` ranges with their checksums (the library's
    default algorithm, XXH3-64), random-ish bytes."""
    from supervise.cluster.shard import Check, ShardMeta
    from supervise.snapshot.hashing import digest

    data = np.empty(nbytes, dtype=np.uint8)
    block = np.random.default_rng(1).integers(0, 256, 64 * MiB, dtype=np.uint8)
    for off in range(0, nbytes, block.size):
        n = min(block.size, nbytes - off)
        data[off : off + n] = block[:n]
        data[off] = (off // block.size) & 0xFF  # no two blocks alike
    step = nbytes // tensors
    checks = []
    view = memoryview(data)
    legacy = []  # the same shard as written before manifest format 2 (xxhash64)
    for i in range(tensors):
        lo, hi = i * step, (nbytes if i == tensors - 1 else (i + 1) * step)
        checks.append(Check(f"layer{i}.weight", lo, hi - lo, digest(view[lo:hi])))
        legacy.append(Check(f"layer{i}.weight", lo, hi - lo, xxhash.xxh64_intdigest(view[lo:hi])))

    def meta_of(version: int, checksum: str = "") -> ShardMeta:
        if checksum == "xxh64":
            return ShardMeta(0, version, 0, nbytes, legacy, b"manifest", "xxh64")
        return ShardMeta(0, version, 0, nbytes, checks, b"manifest")

    return meta_of, data


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process (all threads) or of child ``pid``."""
    if pid is None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- measurements ----------------------------------------------------------------------


def bench_memcpy(src: np.ndarray, repeat: int) -> list[float]:
    dst = np.empty_like(src)
    dst[:] = 0  # touch every page first
    return [timed(lambda: np.copyto(dst, src)) for _ in range(repeat)]


class RawSender:
    """Plain pyzmq DEALER sockets to sink processes (blocking; run from a worker thread)."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.socks: dict[str, zmq.Socket[Any]] = {}
        for name, port in ports.items():
            s = self.ctx.socket(zmq.DEALER)
            s.connect(f"tcp://127.0.0.1:{port}")
            self.socks[name] = s

    def round(self, src: np.ndarray, sinks: list[str], chunk: int, mode: bytes = b"drop") -> float:
        view = memoryview(src)
        n = src.nbytes
        socks = [self.socks[s] for s in sinks]
        t = time.perf_counter()
        for s in socks:
            s.send_multipart([b"round", str(n).encode(), mode])
        for off in range(0, n, chunk):
            piece = view[off : off + chunk]
            for s in socks:
                s.send_multipart([b"data", piece], copy=False)
        for s in socks:
            assert s.recv() == b"done"
        return time.perf_counter() - t

    def close(self) -> None:
        for s in self.socks.values():
            s.send_multipart([b"quit"])
            s.close(linger=1000)
        self.ctx.term()


def bench_all(
    meta_of: Callable[[int], Any],
    src: np.ndarray,
    raw: RawSender,
    holder_ports: dict[int, int],
    chunk: int,
    window: int,
    repeat: int,
    pids: dict[str, int],
) -> dict[str, Any]:
    import trio

    from supervise.cluster import Transport, TransportLimits
    from supervise.cluster.replication import fetch_shard, push_shard

    runs: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    out: dict[str, Any] = {"runs": runs, "cpu": cpu}

    def record(name: str, seconds: float) -> None:
        runs.setdefault(name, []).append(seconds)

    async def measured(name: str, receiver: str, run: Callable[[], Awaitable[float]]) -> None:
        """Record the wall time of ``run`` and the CPU seconds both ends spent on it."""
        before = cpu_seconds() + cpu_seconds(pids[receiver])
        record(name, await run())
        cpu.setdefault(name, []).append(cpu_seconds() + cpu_seconds(pids[receiver]) - before)

    async def main() -> None:
        t = Transport(
            rank=0,
            peers={r: f"127.0.0.1:{p}" for r, p in holder_ports.items()},
            limits=TransportLimits(max_frame_size=64 * MiB),
        )
        view = memoryview(src)
        peers = sorted(holder_ports)
        version = 0

        async def push_all(to: list[int], checksum: str = "") -> float:
            nonlocal version
            version += 1
            meta = meta_of(version, checksum)
            t0 = time.perf_counter()
            async with trio.open_nursery() as n:
                for p in to:
                    n.start_soon(
                        lambda p=p: push_shard(
                            t, p, meta, view, chunk_size=chunk, window=window, timeout=120
                        )
                    )
            return time.perf_counter() - t0

        async def raw_round(sinks: list[str], mode: bytes = b"drop") -> float:
            return await trio.to_thread.run_sync(raw.round, src, sinks, chunk, mode)

        dest = np.ones(src.nbytes, dtype=np.uint8)  # preallocated and touched
        dview = memoryview(dest)

        async with t.running():
            out["first_push"] = await push_all(peers[:1])  # the holder maps fresh memory
            await push_all(peers)  # the second buffer of holder 1, the first of holder 2
            await push_all(peers)  # both holders now recycle buffers
            for _ in range(repeat):
                await measured("raw1", "a", lambda: raw_round(["a"]))
                record("raw1_tuned", await raw_round(["t"]))
                record("hash1", await raw_round(["t"], b"hash"))
                record("floor1", await raw_round(["t"], b"verify"))
                await measured("floor1b", "t", lambda: raw_round(["t"], b"hashcopy"))
                await measured("keep1", "t", lambda: raw_round(["t"], b"keep"))
                await measured("rep1", "1", lambda: push_all(peers[:1]))
                await measured("rep1_xxh64", "1", lambda: push_all(peers[:1], "xxh64"))
                record("raw2", await raw_round(["a", "b"]))
                record("rep2", await push_all(peers))

                async def fetch_into() -> float:
                    t0 = time.perf_counter()
                    meta, got = await fetch_shard(
                        t, peers[0], 0, into=lambda m: dview, chunk_size=chunk, window=window
                    )
                    assert meta.version == version and got[-4096:] == view[-4096:]
                    return time.perf_counter() - t0

                await measured("fetch", "1", fetch_into)
                t0 = time.perf_counter()
                _, fresh = await fetch_shard(t, peers[0], 0, chunk_size=chunk, window=window)
                record("fetch_fresh", time.perf_counter() - t0)
                fresh.release()

    trio.run(main)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, pyzmq {zmq.__version__} / libzmq "
        f"{zmq.zmq_version()}"
    )


BEGIN, END = "<!-- replication:begin -->", "<!-- replication:end -->"


def write_results(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (between its markers), or append it."""
    header = (
        "# Benchmark results\n\nFigures measured by the scripts in `benchmarks/`; each section "
        "says what was measured, how, on which machine, and the command that reproduces it.\n"
    )
    old = RESULTS.read_text() if RESULTS.exists() else header
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n" + block
    RESULTS.write_text(new)


def report(args: argparse.Namespace, nbytes: int, memcpy: list[float], rep: dict[str, Any]) -> str:
    runs: dict[str, list[float]] = rep["runs"]
    med = {k: statistics.median(v) for k, v in runs.items()}
    med["memcpy"] = statistics.median(memcpy)

    def ratio(num: str, den: str) -> float:
        """Median over repetitions of den/num time (throughput ratio within a repetition)."""
        return statistics.median(d / n for n, d in zip(runs[num], runs[den], strict=True))

    size = f"{args.gib:g} GiB"
    rows = [
        ("memcpy into a preallocated buffer (numpy)", "memcpy", 1, None),
        ("raw pyzmq to 1 peer (copy=False, receiver drops)", "raw1", 1, None),
        ("raw pyzmq to 1 peer, receiver with the holders' malloc setting", "raw1_tuned", 1, None),
        ("raw pyzmq to 1 peer + XXH3 of each message in place (no copy)", "hash1", 1, None),
        ("raw pyzmq to 1 peer + `recv_into` + XXH3 (no protocol)", "floor1", 1, None),
        ("raw pyzmq to 1 peer + XXH3 in place + block copy (no protocol)", "floor1b", 1, None),
        ("raw pyzmq to 1 peer + XXH3 in place, receiver keeps the bytes", "keep1", 1, None),
        ("**replication to 1 peer**, steady state", "rep1", 1, "raw1"),
        (
            "replication to 1 peer, xxhash64 checksums (the format before XXH3)",
            "rep1_xxh64",
            1,
            "raw1",
        ),
        ("raw pyzmq to 2 peers", "raw2", 2, None),
        ("**replication to 2 peers**, steady state", "rep2", 2, "raw2"),
        (f"**fetch {size}** from a peer into a preallocated buffer, verified", "fetch", 1, None),
        (f"fetch {size} into fresh memory (first touch)", "fetch_fresh", 1, None),
    ]
    lines = []
    for what, key, peers, vs in rows:
        gbs = peers * nbytes / med[key] / 1e9
        r = f"{ratio(key, vs):.2f}x" if vs else ""
        if key in ("raw1_tuned", "hash1", "floor1", "floor1b", "keep1"):
            r = f"({ratio(key, 'raw1'):.2f}x)"
        lines.append(
            f"| {what} | {med[key]:.3f} s | {gbs:.2f} GB/s{' (sum)' if peers == 2 else ''} | {r} |"
        )
    first = rep["first_push"]
    lines.insert(
        9,
        f"| replication to 1 peer, first push (the holder maps fresh memory) | {first:.3f} s "
        f"| {nbytes / first / 1e9:.2f} GB/s | |",
    )
    table = "\n".join(lines)
    r1, r2 = ratio("rep1", "raw1"), ratio("rep2", "raw2")
    floor = ratio("floor1b", "raw1")
    kept = ratio("rep1", "keep1")

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    fetch_s = med["fetch"] * 2 * GiB / nbytes  # scaled to the target's 2 GiB
    targets = (
        f"Targets (issue 5): replication >= 0.9x raw pyzmq: {verdict(min(r1, r2) >= 0.9)} "
        f"({r1:.2f}x to 1 peer, {r2:.2f}x to 2 peers; the copy plus checksum alone, without any "
        f"protocol, reach {floor:.2f}x here; replication to 1 peer is {kept:.2f}x raw pyzmq whose "
        f"receiver hashes and keeps the bytes as a holder must); fetch of 2 GiB <= 1.5 s: "
        f"{verdict(fetch_s <= 1.5)} ({fetch_s:.2f} s)."
    )
    cpu: dict[str, list[float]] = rep["cpu"]
    per_gib = {k: statistics.median(v) * GiB / nbytes for k, v in cpu.items()}
    cpu_line = (
        "CPU seconds per GiB, both ends together (sender + receiver processes, kernel time "
        "included; median): "
        + ", ".join(
            f"{label} {per_gib[k]:.2f}"
            for label, k in (
                ("raw pyzmq", "raw1"),
                ("raw + XXH3 in place + block copy", "floor1b"),
                ("raw + XXH3 in place, receiver keeps", "keep1"),
                ("replication to 1 peer", "rep1"),
                ("the same with xxhash64", "rep1_xxh64"),
                ("fetch", "fetch"),
            )
        )
        + f". When the cores are contended, throughput follows CPU per byte: raw / replication "
        f"= {per_gib['raw1'] / per_gib['rep1']:.2f}."
    )
    every = max(1, args.window // 2)
    cmd = "python benchmarks/replication.py" + (
        ""
        if (args.gib, args.chunk_mib, args.window, args.repeat)
        == (2.0, DEFAULT_CHUNK_MIB, DEFAULT_WINDOW, 5)
        else f" --gib {args.gib:g} --chunk-mib {args.chunk_mib} --window {args.window} "
        f"--repeat {args.repeat}"
    )
    all_runs = ", ".join(
        f"{k} [{' '.join(f'{s:.2f}' for s in v)}]" for k, v in runs.items() if k != "memcpy"
    )
    return f"""{SECTION}

Replicating one {size} snapshot (64 tensors, XXH3-64 each) over loopback TCP; messages of
{args.chunk_mib} MiB everywhere (the library's default chunk), credit window {args.window}
chunks. Every case ran once per repetition, interleaved, {args.repeat} repetitions; times are
medians, ratios are the median of the per-repetition ratios (same load for both sides).

| what | time | throughput | vs raw pyzmq |
| --- | --- | --- | --- |
{table}

{targets}

{cpu_line}

Replication = `push_shard` from this process to holder processes (`ReplicaEndpoint`): an ack
every {every} chunks returns credits; every chunk is hashed in libzmq's buffer (XXH3-64, verified
per tensor) and kept there as the replica (no copy; superseded versions' buffers are reused by
malloc for the next one); a shard is servable only once complete and verified. Raw pyzmq moves
the same bytes with no acks and no checksum; ratios in parentheses are against raw pyzmq to 1
peer and show what the allocator setting alone, the checksum alone (what replication pays on
the holder), and the copy plus checksum cost or gain without any protocol (received in place
with `recv_into` then hashed, or hashed in libzmq's buffer and copied block by block as fetch
does). Fetch =
`fetch_shard` (pipelined ranged requests, each reply hashed and copied into the destination
the same way) into the destination; "fresh memory" maps a new buffer (transparent huge pages).

Machine: {rep["machine"]}; load average {rep["load_before"]:.2f} before, {rep["load_after"]:.2f}
after the run. Shared with other engineers working in parallel: expect noise.

All runs (seconds): {all_runs}.

Reproduce: `{cmd}`
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="snapshot size (GiB)")
    ap.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_MIB)
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--role", choices=["sink", "tuned-sink", "holder"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    nbytes = int(args.gib * GiB)
    if args.role in ("sink", "tuned-sink"):
        run_sink(args.port, args.role == "tuned-sink", nbytes)
        return
    if args.role == "holder":
        run_holder(args.rank, args.port, args.budget)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the children get killed
    quiet_logs()
    chunk = args.chunk_mib * MiB
    load_before = os.getloadavg()[0]
    print(f"machine: {machine()}; load {load_before:.2f}", flush=True)
    meta_of, src = make_snapshot(nbytes)
    procs: list[subprocess.Popen[str]] = []
    raw: RawSender | None = None
    try:
        memcpy = bench_memcpy(src, args.repeat)
        gib = f"--gib={args.gib}"
        sinks = {
            "a": spawn("--role", "sink", gib),
            "b": spawn("--role", "sink", gib),
            "t": spawn("--role", "tuned-sink", gib),
        }
        procs += [p for p, _ in sinks.values()]
        raw = RawSender({name: port for name, (_, port) in sinks.items()})
        budget = 2 * nbytes + 256 * MiB  # the held version plus the one arriving
        holders = {
            r: spawn("--role", "holder", "--rank", str(r), "--budget", str(budget)) for r in (1, 2)
        }
        procs += [p for p, _ in holders.values()]
        rep = bench_all(
            meta_of,
            src,
            raw,
            {r: port for r, (_, port) in holders.items()},
            chunk,
            args.window,
            args.repeat,
            {
                **{name: p.pid for name, (p, _) in sinks.items()},
                **{str(r): p.pid for r, (p, _) in holders.items()},
            },
        )
    finally:
        if raw is not None:
            raw.close()
        for p in procs:
            p.kill()
            p.wait()
    rep["machine"] = machine()
    rep["load_before"] = load_before
    rep["load_after"] = os.getloadavg()[0]
    print(json.dumps(rep["runs"]), flush=True)
    text = report(args, nbytes, memcpy, rep)
    print(text)
    if not args.no_write:
        write_results(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
