"""Snapshot benchmark: stall per snapshot, restore time and training overhead, side by side.

On the same training state (a model + AdamW state), in one run:
- stall per snapshot (time the training loop is blocked): Snapshotter; torch.save to local
  disk; torch.distributed.checkpoint.async_save; a plain copy into a preallocated buffer
  (the floor);
- restore: Snapshotter.restore from RAM vs torch.load + load_state_dict vs the plain copy back;
- training throughput with a Snapshotter capture every 1, 2, 5, 10 steps vs none.

    python benchmarks/snapshot.py                  # CPU, ~1 GiB of state
    python benchmarks/snapshot.py --device cuda    # the 1.2B-param AdamW model (13.5 GiB)

Writes the "## Snapshot" section of benchmarks/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from supervise.policy import Policy
from supervise.torch import Snapshotter

RESULTS = Path(__file__).with_name("RESULTS.md")


class Block(torch.nn.Module):
    """The transformer block of shared/probes/gpu_snapshot_limits.py."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, d // 128, batch_first=True)
        self.ln2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def build(device: str, size_gib: float):  # type: ignore[no-untyped-def]
    if device == "cuda":
        model = torch.nn.Sequential(*[Block(2048) for _ in range(24)]).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randn(8, 1024, 2048, device="cuda")

        def step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return model, opt, step
    # CPU: an MLP whose params + AdamW state come to ``size_gib``
    d = 2048
    layers = max(1, round(size_gib * 2**30 / (3 * 4 * d * d)))
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(32, d)

    def step() -> None:
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def state_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    ts = [t for t in model.state_dict().values()]
    ts += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size-gib", type=float, default=1.0, help="CPU state size")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each timing")
    ap.add_argument("--rounds", type=int, default=3, help="10-step rounds per setting")
    ap.add_argument("--disk", default=None, help="directory for torch.save/DCP (default: tmp)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    dev = args.device
    torch.manual_seed(0)
    model, opt, train_step = build(dev, args.size_gib)
    for _ in range(2):
        train_step()
    sync(dev)
    tensors = state_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    print(f"state: {nbytes / 2**30:.2f} GiB in {len(tensors)} tensors", flush=True)
    base = Path(args.disk or tempfile.mkdtemp(prefix="supervise-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    res: dict[str, float] = {}

    # step time without snapshots
    times = []
    for _ in range(args.reps):
        sync(dev)
        t = time.perf_counter()
        train_step()
        sync(dev)
        times.append(time.perf_counter() - t)
    res["step_s"] = statistics.median(times)

    # floor: a plain copy into a preallocated (already touched) buffer of the same bytes
    flat = torch.empty(nbytes, dtype=torch.uint8, pin_memory=dev == "cuda")
    flat.fill_(0)
    views, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        views.append(flat[off : off + n].view(t.dtype).view(t.shape))
        off += n

    def plain_copy() -> None:
        for v, t in zip(views, tensors, strict=True):
            v.copy_(t, non_blocking=dev == "cuda")
        sync(dev)

    def plain_restore() -> None:
        with torch.no_grad():
            for v, t in zip(views, tensors, strict=True):
                t.copy_(v, non_blocking=dev == "cuda")
        sync(dev)

    # Snapshotter (RAM only, no persist), interleaved with the floor so that drift of a
    # shared machine hits both alike. Stall = time capture() blocks + time the next
    # optimizer.step waits for the background copy.
    pol = Policy.from_dict(
        {"snapshot": {"every_steps": 0}, "persist": {"every_snapshots": 0, "path": str(base / "p")}}
    )
    snap = Snapshotter(model, opt, policy=pol)
    snap.capture(0)  # creates (and faults in) the arena outside the timing
    snap.wait()
    floors, stalls, copies, sums, rfloors, restores = [], [], [], [], [], []
    bg_cpu: list[float] = []
    for i in range(args.reps):
        floors.append(timed(plain_copy, 1))
        train_step()
        snap.capture(1 + i)
        train_step()  # forward/backward overlap the copy; optimizer.step waits if needed
        snap.wait()
        c = snap.last_capture
        assert c is not None and c.committed
        stalls.append(c.stall_s)
        copies.append(c.copy_s)
        bg_cpu.append(c.background_cpu_s)
        sums.append(c.checksum_s)
        for _ in range(3):  # cheap: a few more samples of each, alternating
            rfloors.append(timed(plain_restore, 1))
            restores.append(timed(snap.restore, 1))
    # side by side under drifting noise: medians, and the median of the paired ratios
    res["plain_copy_s"] = statistics.median(floors)
    res["snap_stall_ratio"] = statistics.median(a / b for a, b in zip(stalls, floors, strict=True))
    res["snap_stall_s"] = statistics.median(stalls)
    res["snap_stall_max_s"] = max(stalls)
    res["snap_copy_s"] = statistics.median(copies)
    res["snap_checksum_s"] = statistics.median(sums)
    res["snap_bg_cpu_s"] = statistics.median(bg_cpu)
    res["plain_restore_s"] = statistics.median(rfloors)
    res["snap_restore_s"] = statistics.median(restores)
    res["snap_restore_ratio"] = statistics.median(
        a / b for a, b in zip(restores, rfloors, strict=True)
    )

    # torch.save to local disk (blocking), then torch.load + load_state_dict
    path = base / "ckpt.pt"

    def save() -> None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)

    res["torch_save_s"] = timed(save, 2, best=True)

    def load() -> None:
        sd = torch.load(path, map_location=dev)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
        sync(dev)

    res["torch_load_s"] = timed(load, 2, best=True)
    path.unlink()

    # DCP async_save: time the call blocks, and until the write completes
    try:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=0, world_size=1)
        blocks, totals = [], []
        for _ in range(2):
            out = base / "dcp"
            shutil.rmtree(out, ignore_errors=True)
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            t = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=str(out))
            blocks.append(time.perf_counter() - t)
            fut.result()
            totals.append(time.perf_counter() - t)
        res["dcp_block_s"] = min(blocks)
        res["dcp_total_s"] = min(totals)
        dist.destroy_process_group()
    except Exception as exc:  # an API difference must not lose the other figures
        print(f"DCP async_save unavailable: {type(exc).__name__}: {exc}")

    # throughput with a capture every 1, 2, 5, 10 steps: rounds of 10 steps per setting,
    # the settings interleaved round by round (noise hits them alike)
    # Wall time is at the mercy of neighbours on a shared machine; the process's CPU time
    # (training and snapshot threads together) is far steadier and, when training keeps
    # every core busy, is what a capture costs the training.
    best = dict.fromkeys((0, 1, 2, 5, 10), float("inf"))
    cpu = dict.fromkeys((0, 1, 2, 5, 10), float("inf"))
    for _ in range(args.rounds):
        for every in list(best):
            sync(dev)
            t, c = time.perf_counter(), time.process_time()
            for i in range(10):
                train_step()
                snap.step(i)
                if every and i % every == 0:
                    snap.capture(i)
            snap.wait()
            sync(dev)
            best[every] = min(best[every], (time.perf_counter() - t) / 10)
            cpu[every] = min(cpu[every], (time.process_time() - c) / 10)
    for every in best:
        res[f"every{every}_step_s"] = best[every]
        res[f"every{every}_cpu_s"] = cpu[every]
    snap.close()
    shutil.rmtree(base, ignore_errors=True)
    report(res, nbytes, args)


def timed(fn, reps: int, *, best: bool = False) -> float:  # type: ignore[no-untyped-def]
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts) if best else statistics.median(ts)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM{gpu}; torch {torch.__version__}; "
        f"load average at the end {load}"
    )


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(
    r: dict[str, float],
    thr: list[tuple[int, float, float]],
    base_step: float,
    stall: float,
    device: str,
) -> str:
    """The issue's targets for this device, each with its measured figure."""
    if device == "cuda":
        d2h = r["plain_copy_s"] / r["snap_copy_s"]  # same bytes: a ratio of throughputs
        over = {e: s / base_step - 1 for e, s, _ in thr}
        return (
            f"Targets (GPU): device-to-host >= 90% of the pinned floor: {_met(d2h >= 0.9)} "
            f"({d2h:.0%}); overhead <= 1% every 10 steps: {_met(over.get(10, 1) <= 0.01)} "
            f"({over.get(10, float('nan')):+.1%}); <= 3% every 2 steps: "
            f"{_met(over.get(2, 1) <= 0.03)} ({over.get(2, float('nan')):+.1%}); restore from "
            f"RAM <= 0.35 s: {_met(r['snap_restore_s'] <= 0.35)} "
            f"({r['snap_restore_s']:.3f} s)."
        )
    return (
        f"Targets (CPU): stall <= 1.5x the plain copy: {_met(r['snap_stall_ratio'] <= 1.5)} "
        f"({r['snap_stall_ratio']:.2f}x); stall <= 1/10 of torch.save: "
        f"{_met(stall <= r['torch_save_s'] / 10)} ({stall / r['torch_save_s']:.3f}); restore "
        f"<= 1.5x the plain copy: {_met(r['snap_restore_ratio'] <= 1.5)} "
        f"({r['snap_restore_ratio']:.2f}x)."
    )


def report(r: dict[str, float], nbytes: int, args: argparse.Namespace) -> None:
    gb = nbytes / 1e9
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    floor = r["plain_copy_s"]
    rows = [
        (
            "plain copy into a preallocated buffer (floor)",
            ms(floor),
            "1.00x",
            f"{gb / floor:.1f} GB/s",
        ),
        (
            "Snapshotter (capture + the next optimizer step's wait)",
            ms(r["snap_stall_s"]),
            f"{r['snap_stall_ratio']:.2f}x",
            f"max {ms(r['snap_stall_max_s'])}; in the background: copy {ms(r['snap_copy_s'])} "
            f"({gb / r['snap_copy_s']:.1f} GB/s), checksums {ms(r['snap_checksum_s'])}",
        ),
        (
            "torch.save to local disk",
            ms(r["torch_save_s"]),
            f"{r['torch_save_s'] / floor:.2f}x",
            "",
        ),
    ]
    if "dcp_block_s" in r:
        rows.append(
            (
                "DCP async_save (call blocks)",
                ms(r["dcp_block_s"]),
                f"{r['dcp_block_s'] / floor:.2f}x",
                f"written after {ms(r['dcp_total_s'])}",
            )
        )
    rfloor = r["plain_restore_s"]
    restore_rows = [
        ("plain copy back into the model (floor)", ms(rfloor), "1.00x"),
        (
            "Snapshotter.restore from RAM (verify + in-place copy)",
            ms(r["snap_restore_s"]),
            f"{r['snap_restore_ratio']:.2f}x",
        ),
        (
            "torch.load + load_state_dict",
            ms(r["torch_load_s"]),
            f"{r['torch_load_s'] / rfloor:.2f}x",
        ),
    ]
    base_step = r["every0_step_s"]
    base_cpu = r["every0_cpu_s"]
    thr = [(e, r[f"every{e}_step_s"], r[f"every{e}_cpu_s"]) for e in (1, 2, 5, 10)]
    stall = r["snap_stall_s"]
    lines = [
        "## Snapshot (`benchmarks/snapshot.py`)",
        "",
        f"What: `benchmarks/snapshot.py --device {args.device}`; {nbytes / 2**30:.2f} GiB of "
        "training state (parameters + AdamW state), all methods on the same state in one run; "
        f"medians of {args.reps} interleaved repetitions (restore: {3 * args.reps}), ratios = "
        f"median of the paired ratios. Machine: {machine()}. "
        "Shared machine: expect noise.",
        "",
        "Stall per snapshot (time the training loop is blocked):",
        "",
        "| method | stall | vs floor | note |",
        "| --- | --- | --- | --- |",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "Restore:",
        "",
        "| method | time | vs floor |",
        "| --- | --- | --- |",
        *[f"| {a} | {b} | {c} |" for a, b, c in restore_rows],
        "",
        f"Training step without snapshots: {ms(base_step)} wall, {ms(base_cpu)} CPU time "
        "(both cores); with a capture every N steps:",
        "",
        "| every | wall time per step | overhead | CPU time per step | overhead |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {e} | {ms(s)} | {(s / base_step - 1) * 100:+.1f}% | {ms(c)} | "
            f"{(c / base_cpu - 1) * 100:+.1f}% |"
            for e, s, c in thr
        ],
        "",
        f"A capture's background work (copy, checksums, commit) used {ms(r['snap_bg_cpu_s'])} "
        f"of CPU time, {r['snap_bg_cpu_s'] / base_cpu * 100:.0f}% of a training step's CPU "
        "time: when training keeps every core busy, expect about that overhead divided by N "
        "with a capture every N steps (the measured rows above are noisy on a shared machine).",
        "",
        targets(r, thr, base_step, stall, args.device),
        "",
        "How: Snapshotter stall = time `capture` blocks plus time the next `optimizer.step` "
        "waited for the background copy (its pre-hook), measured in a loop that trains one step "
        "between captures, interleaved with the floor; torch.save/DCP = time the call blocks (no "
        "fsync); restore = `Snapshotter.restore()` from the RAM arena with every checksum "
        "verified, in place; throughput = mean wall and CPU time (``time.process_time``, all "
        "threads) per step of a 10-step round, best of "
        f"{args.rounds} rounds per setting, the settings interleaved round by round. Best-of "
        "(the least disturbed run) because the machine is shared. RAM snapshots only (no "
        "persist tier).",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/snapshot.py --device {args.device}"
        + (f" --size-gib {args.size_gib:g}" if args.device == "cpu" else "")
        + "`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.no_write:
        return
    tag = "snapshot" if args.device == "cpu" else f"snapshot_{args.device}"
    if args.device != "cpu":
        text = text.replace("## Snapshot", f"## Snapshot, {args.device}", 1)
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    section = f"{begin}\n{text.rstrip()}\n{end}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _m: section, old)
    else:
        new = old.rstrip("\n") + "\n" + section + "\n"
    RESULTS.write_text(new)


if __name__ == "__main__":
    main()
