"""Resumable tasks on one machine: what a commit costs per step, and what resuming saves.

Side by side in one run, attempts in real worker processes (`run_local`):

1. Commit overhead: a task holding 10 MiB of state (`ctx.state`) runs 20 short steps, once
   committing after every step (the default) and once only at its end (`Manual`); the
   difference per step is the commit's cost, shown as a share of a 1 s step. Journals: in the
   supervising process's RAM (`JournalHost`, the default) and on disk (fsynced files).
2. Resume vs restart (seed 004's table): a 10-step task is killed (SIGKILL) in the middle of the
   step at 25/50/75/90% of its work; the time to completion when the next attempt resumes from
   the journal, against restarting from scratch (the same task with no step replayed).

    .venv/bin/python benchmarks/tasks.py            # prints, updates RESULTS.md
    .venv/bin/python benchmarks/tasks.py --no-write  # prints only
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from supervise.runtime import ProcessHandle
from supervise.tasks import Manual, TaskContext, TaskPolicy, TaskSpec, run_local, unwrap

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- tasks:begin -->", "<!-- tasks:end -->"
STATE_MIB = 10
COMMIT_STEPS = 20
STEP_S = 0.05
RESUME_STEPS = 10
RESUME_STEP_S = 0.3
FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return 1


async def state_task(ctx: TaskContext, steps: int, mib: int, step_s: float) -> float:
    """``steps`` steps of ``step_s`` with ``mib`` MiB of state; seconds from first to last."""
    if "w" not in ctx.state:
        ctx.state["w"] = np.zeros(mib * 2**20 // 8)
    t0 = time.perf_counter()
    for i in range(steps):
        await ctx.step(f"s{i}", _sleep, step_s)
        ctx.state["w"][i] = i  # the state changes between steps
    if not isinstance(ctx._cadence.spec, Manual):
        return time.perf_counter() - t0
    await ctx.checkpoint()
    return time.perf_counter() - t0


def _mark(log: str, i: int) -> int:
    with open(log, "a") as f:
        f.write(f"{i}\n")
    time.sleep(RESUME_STEP_S)
    return i


async def steps_task(ctx: TaskContext, log: str, restart: bool) -> int:
    """RESUME_STEPS steps; with ``restart`` nothing is replayed (step names per attempt)."""
    total = 0
    for i in range(RESUME_STEPS):
        name = f"s{i}-a{ctx.attempt}" if restart else f"s{i}"
        total += await ctx.step(name, _mark, log, i)
    return total


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(HERE)}


async def commit_overhead(tmp: Path) -> list[tuple[str, float, float]]:
    out = []
    for journal in ("ram", "disk"):
        times = {}
        for label, policy in (("every", TaskPolicy()), ("manual", TaskPolicy(checkpoint=Manual()))):
            best = float("inf")
            for rep in range(3):
                spec = TaskSpec(
                    "tasks:state_task", (COMMIT_STEPS, STATE_MIB, STEP_S), policy=policy
                )
                r = await run_local(
                    spec, tmp / f"c-{journal}-{label}-{rep}", journal=journal, env=_env()
                )
                best = min(best, unwrap(r))
            times[label] = best
        per_step = (times["every"] - times["manual"]) / COMMIT_STEPS
        out.append((journal, per_step, per_step / 1.0))
    return out


async def one_run(tmp: Path, fraction: float | None, restart: bool) -> float:
    log = tmp / f"log-{fraction}-{restart}"
    spec = TaskSpec("tasks:steps_task", (str(log), restart))
    kill_at = None if fraction is None else int(fraction * RESUME_STEPS)

    async def killer(handle: ProcessHandle) -> None:
        while not (log.exists() and f"{kill_at}\n" in log.read_text()):  # noqa: ASYNC110
            await trio.sleep(0.005)
        await trio.sleep(RESUME_STEP_S / 2)
        os.kill(handle.pid, signal.SIGKILL)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:

        def started(attempt: int, handle: ProcessHandle) -> None:
            if kill_at is not None and attempt == 1:
                nursery.start_soon(killer, handle)

        result = await run_local(
            spec, tmp / f"r-{fraction}-{restart}", env=_env(), on_started=started
        )
    unwrap(result)
    return time.perf_counter() - t0


async def resume_vs_restart(tmp: Path) -> tuple[float, list[tuple[float, float, float]]]:
    clean = await one_run(tmp, None, False)
    rows = []
    for f in FRACTIONS:
        rows.append((f, await one_run(tmp, f, False), await one_run(tmp, f, True)))
    return clean, rows


def _report(commits: list[tuple[str, float, float]], clean: float, rows: list[Any]) -> str:
    lines = [
        BEGIN,
        "## Resumable tasks (`benchmarks/tasks.py`)",
        "",
        f"Commit overhead: a task holding {STATE_MIB} MiB of state runs {COMMIT_STEPS} steps in a "
        "worker process, committing after every step (the default) vs only at its end "
        "(`Manual`); best of 3, the difference per step. Each commit encodes the state and "
        "writes it (and every step result so far) to the journal.",
        "",
        "| journal | commit cost per step | share of a 1 s step |",
        "| --- | --- | --- |",
    ]
    for journal, per_step, share in commits:
        where = "RAM arenas of the supervising process" if journal == "ram" else "disk (fsync)"
        lines.append(f"| {where} | {per_step * 1000:.1f} ms | {share * 100:.1f}% |")
    lines += [
        "",
        f"Resume vs restart: a task of {RESUME_STEPS} steps x {RESUME_STEP_S:g} s, its worker "
        "killed (SIGKILL) half-way through the step at each point; wall time from submit to "
        f"completion, worker start-ups included. A failure-free run: {clean:.2f} s.",
        "",
        "| failure at | resume (journal) | restart from scratch | time lost: resume / restart |",
        "| --- | --- | --- | --- |",
    ]
    for f, resume, restart in rows:
        lines.append(
            f"| {f * 100:.0f}% | {resume:.2f} s | {restart:.2f} s | "
            f"{resume - clean:+.2f} s / {restart - clean:+.2f} s |"
        )
    lines += [
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; shared with other work (load average "
        f"{os.getloadavg()[0]:.1f} at the end: noisy, compare within a row).",
        "Reproduce: `.venv/bin/python benchmarks/tasks.py`.",
        END,
    ]
    return "\n".join(lines)


async def main(write: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        commits = await commit_overhead(tmp)
        clean, rows = await resume_vs_restart(tmp)
    report = _report(commits, clean, rows)
    print(report)
    if write:
        text = RESULTS.read_text()
        if BEGIN in text:
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), report, text, flags=re.S)
        else:
            text = text.rstrip() + "\n" + report + "\n"
        RESULTS.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    opts = parser.parse_args()
    sys.exit(trio.run(main, not opts.no_write))
