"""Failure-free snapshot overhead, focused: wall time and CPU time per training step of the
recovery benchmark's model (`supervise._demo.train --hidden 2048`, 2 nodes x 1 worker, gloo),
side by side in one run, interleaved round by round:

- bare: the training alone, started by a torchrun-style launcher (no checkpoints);
- supervise, no snapshots: the same under two node agents, ``snapshot.every_steps = 0``;
- supervise, every K steps: snapshots every K steps (RAM, replicated to the peer);
- with ``--replicate-every S``: the same, replicated at most every S seconds
  (`replication.every_seconds`).

Both are measured over the steady state (from step 10 to 5 steps before the end, process
starts and imports excluded): CPU time = user + system seconds of every descendant process of
this one (agents, workers, spare workers, the launcher's workers; read from /proc), divided by
the steps. Spare workers are off unless ``--spares`` (their idle-class torch import is not a
snapshot cost).
On a machine shared with other work the wall time moves with the load; the CPU time per step
is what the snapshots take from the training when every core is busy, and moves much less.

    python benchmarks/snapshot_overhead.py [--steps 150] [--rounds 2] [--every 5]
        [--replicate-every SECONDS ...]

Prints the figures (no RESULTS.md section of its own: the recovery benchmark's "failure-free
overhead" is the figure of record; this one is for iterating on it quickly).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recovery import (  # type: ignore[import-not-found]
    BaselineRun,
    Config,
    Run,
    SuperviseRun,
    running,
)

TICK = os.sysconf("SC_CLK_TCK")
FIRST = 10  # the steady state starts here
ROLES = ("agents", "workers", "other")


def role(pid: int) -> str:
    """What a descendant process is, from its command line: agent, worker or other."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    if b"node" in argv and any(a.endswith(b"supervise") for a in argv):
        return "agents"
    return "workers" if any(b"train" in a for a in argv) else "other"


def descendants_cpu() -> dict[str, float]:
    """User + system CPU seconds of every live descendant of this process, by role."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / TICK
    me = os.getpid()
    total = dict.fromkeys(ROLES, 0.0)
    for pid, seconds in cpu.items():
        p = parent.get(pid)
        while p is not None and p not in (me, 0, 1):
            p = parent.get(p)
        if p == me:
            total[role(pid)] += seconds
    return total


def one(run: Run, steps: int) -> tuple[float, dict[str, float]]:
    """Wall and CPU seconds (by role) per step of one run's steady state."""
    last = steps - 5
    with running(run, steps, out=False):
        run.progress.wait(
            lambda: (run.progress.current_step(run.ranks) or -1) >= FIRST, 600, "step 10"
        )
        c0, t0, s0 = descendants_cpu(), time.monotonic(), run.progress.current_step(run.ranks)
        run.progress.wait(
            lambda: (run.progress.current_step(run.ranks) or -1) >= last, 1800, f"step {last}"
        )
        c1, t1, s1 = descendants_cpu(), time.monotonic(), run.progress.current_step(run.ranks)
        run.wait_finished(timeout=600)
    n = (s1 or 0) - (s0 or 0)
    return (t1 - t0) / n, {r: (c1[r] - c0[r]) / n for r in ROLES}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument(
        "--replicate-every",
        action="append",
        type=float,
        default=[],
        help="also a snapshot run with replication.every_seconds = this (repeatable)",
    )
    ap.add_argument("--spares", action="store_true", help="keep the policy's spare workers")
    args = ap.parse_args()
    from supervise._testing import OtlpSink

    workdir = Path(tempfile.mkdtemp(prefix="snapoverhead-"))
    print(f"work directory {workdir}; load {os.getloadavg()}", flush=True)
    sink = OtlpSink().start()
    snapshots = f"supervise, every {args.every} steps"
    # each snapshot run's replication.every_seconds (0: every snapshot replicated)
    spacing = {snapshots: 0.0} | {
        f"{snapshots}, replicated every {s:g} s": s for s in args.replicate_every
    }
    names = ["bare", "supervise, no snapshots", *spacing]
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    split: dict[str, dict[str, list[float]]] = {n: {r: [] for r in ROLES} for n in names}
    try:
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                every = 0 if "no snapshots" in name else args.every
                cfg = Config(
                    hidden=args.hidden,
                    sv_every=every,
                    sv_preload=None if args.spares else (),
                    sv_replicate_every=spacing.get(name, 0.0),
                )
                cfg.workdir = workdir
                tag = f"r{rnd}-{names.index(name)}"
                run: Run = (
                    BaselineRun(cfg, tag, every=0)
                    if name == "bare"
                    else SuperviseRun(cfg, tag, sink)
                )
                w, by_role = one(run, args.steps)
                c = sum(by_role.values())
                wall[name].append(w)
                cpu[name].append(c)
                for r in ROLES:
                    split[name][r].append(by_role[r])
                roles = ", ".join(f"{r} {by_role[r] * 1000:.1f}" for r in ROLES)
                print(
                    f"  {name:50} {w * 1000:7.1f} ms/step wall, {c * 1000:7.1f} ms CPU/step "
                    f"({roles}); load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    finally:
        sink.stop()
    base_w, base_c = statistics.median(wall["bare"]), statistics.median(cpu["bare"])
    print(f"\nmedians over {args.rounds} round(s), {args.steps} steps each:")
    print("| run | wall/step | vs bare | CPU/step | vs bare | " + " | ".join(ROLES) + " |")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        roles = " | ".join(f"{statistics.median(split[name][r]) * 1000:.1f} ms" for r in ROLES)
        print(
            f"| {name} | {w * 1000:.1f} ms | {w / base_w - 1:+.1%} | {c * 1000:.1f} ms | "
            f"{c / base_c - 1:+.1%} | {roles} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
