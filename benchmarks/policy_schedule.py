"""How much the capture decision costs per training step, next to a bare modulo check.

The Snapshotter calls `CaptureSchedule.decide` after every step, so it must stay in the
microseconds. Side by side in one run (the ratio is what carries over between machines):

    .venv/bin/python benchmarks/policy_schedule.py            # prints, updates RESULTS.md
    .venv/bin/python benchmarks/policy_schedule.py --no-write  # prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import timeit
from pathlib import Path

import supervise as sv
from supervise.policy import CaptureSchedule

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- policy_schedule:begin -->", "<!-- policy_schedule:end -->"
CALLS = 200_000


def baseline(step: int, every: int = 10) -> bool:
    """The cheapest possible schedule: the check a training loop would inline."""
    return step % every == 0


def measure() -> list[tuple[str, float]]:
    steps_only = CaptureSchedule(every_steps=10)
    everything = CaptureSchedule.from_policy(
        sv.Policy(
            snapshot=sv.SnapshotSchedule(
                every_steps=10, every_seconds=30.0, on_best="loss", milestones=(0.25, 0.5, 0.75)
            )
        ),
        total_steps=1_000_000,
    )
    state = steps_only.start(0.0)
    busy = everything.record(everything.start(0.0), 0, 0.0, {"loss": 0.1})
    metrics = {"loss": 0.5, "accuracy": 0.9}
    cases = {
        "bare `step % 10 == 0` (baseline)": lambda: baseline(12_345),
        "decide: every_steps only": lambda: steps_only.decide(state, 12_345, 1.0),
        "decide: steps + seconds + best + 3 milestones": lambda: everything.decide(
            busy, 12_345, 1.0, metrics
        ),
        "record (after a capture)": lambda: everything.record(busy, 12_345, 1.0, metrics),
    }
    out = []
    for name, fn in cases.items():
        best = min(timeit.repeat(fn, number=CALLS, repeat=7)) / CALLS
        out.append((name, best))
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(figures: list[tuple[str, float]]) -> str:
    base = figures[0][1]
    lines = [
        BEGIN,
        "## Capture schedule: cost per training step (`benchmarks/policy_schedule.py`)",
        "",
        "What: `CaptureSchedule.decide`, called by the Snapshotter after every training step,",
        "next to the bare modulo check a training loop would inline (both through a Python call).",
        f"How: `timeit`, best of 7 repeats of {CALLS:,} calls, all cases in one run.",
        f"Machine: {_cpu()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "(shared with other work: compare the ratios, not the nanoseconds).",
        "Reproduce: `.venv/bin/python benchmarks/policy_schedule.py`.",
        "",
        "| case | per call | vs baseline |",
        "| --- | --- | --- |",
    ]
    for name, seconds in figures:
        lines.append(f"| {name} | {seconds * 1e9:,.0f} ns | {seconds / base:.1f}x |")
    lines.append(END)
    return "\n".join(lines)


def write(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    section = report(measure())
    print(section)
    if not args.no_write:
        write(section)


if __name__ == "__main__":
    main()
