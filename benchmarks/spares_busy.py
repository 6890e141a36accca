"""Spares on a busy machine: worker crash and NaN recovery (failure -> next completed step)
with the machine quiet and with one core kept busy by another process (a Python busy loop
started here), for spares forked from the node's template (``recovery.fork_server = true``,
the default) and for spares that import on their own in the idle scheduling class (``false``,
the previous behaviour), side by side in one run.

Uses the recovery benchmark's harness (`benchmarks/recovery.py`: two ``supervise node``
agents on loopback training ``supervise._demo.train``, recovery phases from their spans).

    python benchmarks/spares_busy.py            # 2 trials per kind, load and spare kind
    python benchmarks/spares_busy.py --reps 1   # quicker

Writes the "## Spares on a busy machine" section of benchmarks/RESULTS.md (``--no-write``
to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import recovery as rec  # noqa: E402

BEGIN, END = "<!-- spares-busy:begin -->", "<!-- spares-busy:end -->"
KINDS = ("crash", "nan")
LOADS = ("quiet", "one core busy")
SPARES = ("forked", "spawned")
SPARES_WAIT = 15.0  # seconds a trial waits for warm spares before it injects anyway


class Run(rec.SuperviseRun):
    """A supervise run whose spares are forked from the template or spawned."""

    def __init__(self, cfg: rec.Config, name: str, sink: Any, *, fork_server: bool) -> None:
        super().__init__(cfg, name, sink)
        text = self.policy.read_text()
        flag = "true" if fork_server else "false"
        self.policy.write_text(text.replace("[recovery]\n", f"[recovery]\nfork_server = {flag}\n"))


@contextlib.contextmanager
def busy_core(on: bool) -> Iterator[None]:
    """Another process keeping one core busy (a Python busy loop), or nothing."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2, help="runs per load and spare kind")
    ap.add_argument("--hidden", type=int, default=2048, help="demo model width")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    from supervise._testing import OtlpSink

    cfg = rec.Config(
        hidden=args.hidden,
        kinds=KINDS,
        settle_steps=150,
        step_delay=0.05,
        spares_wait=SPARES_WAIT,
        peer_timeout=10.0,
    )  # paced, long enough to outlast the waits for spares; no false node loss under load
    cfg.workdir = Path(tempfile.mkdtemp(prefix="sparesbench-"))
    floors = rec.Floors(1 << 20)
    rng = random.Random(cfg.seed)
    results: dict[tuple[str, str, str], list[float]] = {}
    warm: dict[tuple[str, str], list[bool]] = {}
    started = time.time()
    load_start = rec.load_average()
    sink = OtlpSink().start()
    try:
        for rep in range(args.reps):
            for load in LOADS if rep % 2 == 0 else LOADS[::-1]:
                for spares in SPARES if rep % 2 == 0 else SPARES[::-1]:
                    print(f"rep {rep}: {load}, {spares} spares")
                    sink.clear()
                    run = Run(
                        cfg,
                        f"{rep}-{load.replace(' ', '-')}-{spares}",
                        sink,
                        fork_server=spares == "forked",
                    )
                    with busy_core(load != "quiet"):
                        trials = rec.trial_run(cfg, run, rep, list(KINDS), floors, rng)
                    for t in trials:
                        if not t.detail.get("error"):
                            results.setdefault((t.kind, load, spares), []).append(t.total)
                            warm.setdefault((load, spares), []).append(
                                bool(t.detail.get("spares_ready"))
                            )
    finally:
        sink.stop()
        shutil.rmtree(cfg.workdir, ignore_errors=True)
    text = report(results, warm, args, load_start, (time.time() - started) / 60)
    print()
    print(text)
    if not args.no_write:
        write(text)
        print(f"wrote {rec.RESULTS}")
    return 0


def report(
    results: dict[tuple[str, str, str], list[float]],
    warm: dict[tuple[str, str], list[bool]],
    args: argparse.Namespace,
    load_start: str,
    minutes: float,
) -> str:
    def cell(kind: str, load: str, spares: str) -> str:
        xs = results.get((kind, load, spares), [])
        if not xs:
            return "-"
        return f"{statistics.median(xs):.2f} s ({len(xs)})"

    lines = [
        "## Spares on a busy machine",
        "",
        f"`python benchmarks/spares_busy.py --reps {args.reps}`, {time.strftime('%Y-%m-%d')}; "
        f"{rec.machine()}; load {load_start} at the start; {minutes:.1f} min. Two node agents, "
        f"one worker each, demo model `--hidden {args.hidden}`; time from the failure to the "
        "next completed step on every rank, median (trials). *one core busy*: a Python busy "
        "loop runs throughout. *forked*: `recovery.fork_server = true` (the default); "
        "*spawned*: `false` (each spare imports `recovery.preload` on its own, idle class).",
        "",
        "| failure | load | forked spares | spawned spares |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        for load in LOADS:
            lines.append(
                f"| {kind} | {load} | {cell(kind, load, 'forked')} | "
                f"{cell(kind, load, 'spawned')} |"
            )
    lines += [
        "",
        f"Spares warm when the failure came (waited for up to {SPARES_WAIT:g} s, the run paced "
        "at `--step-delay 0.05`):",
    ]
    for load in LOADS:
        parts = []
        for spares in SPARES:
            ws = warm.get((load, spares), [])
            parts.append(f"{spares} {sum(ws)}/{len(ws)}")
        lines.append(f"- {load}: {', '.join(parts)}")
    return "\n".join(lines) + "\n"


def write(text: str) -> None:
    path = rec.RESULTS
    old = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{text}{END}\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        new = head + block + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


if __name__ == "__main__":
    raise SystemExit(main())
