"""A five-stage pipeline that survives a kill -9: ingest, clean, features, train, evaluate.

    python examples/resumable_pipeline.py

It runs the pipeline twice. First in this process, without failures: the reference. Then in
worker processes under the supervision runtime, with the worker killed (SIGKILL) in the middle
of the "train" step. Each step's result was committed to the task's journal, held in this
process's RAM (shared-memory arenas it serves to the workers), so the kill loses nothing: the
next attempt gets ingest, clean and features back from the journal, runs train again and goes
on. Every stage appends to an effects log when it starts and when it
finishes (the side effects we count); the program checks that the result equals the
reference and that no finished stage ran twice, and exits 1 if not.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from supervise.runtime import ProcessHandle
from supervise.tasks import (
    InProcess,
    MemoryJournal,
    TaskContext,
    TaskRunner,
    TaskSpec,
    Transition,
    run_local,
    unwrap,
)

HERE = Path(__file__).resolve().parent
STAGES = ("ingest", "clean", "features", "train", "evaluate")


def effect(workdir: str, stage: str, what: str) -> None:
    """A side effect: one line appended to the effects log (start / done, with the pid)."""
    with open(Path(workdir) / "effects.log", "a") as f:
        f.write(f"{what} {stage} {os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())


def ingest(workdir: str, rows: int, seed: int) -> dict[str, Any]:
    """Synthetic data: 4 features, a linear boundary, label noise, 2% of rows with a NaN."""
    effect(workdir, "ingest", "start")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 4))
    y = x @ np.array([1.5, -2.0, 0.5, 1.0]) + rng.normal(scale=0.5, size=rows) > 0
    x[rng.random(rows) < 0.02, rng.integers(0, 4)] = np.nan
    effect(workdir, "ingest", "done")
    return {"x": x, "y": y.astype(np.int8)}


def clean(workdir: str, data: dict[str, Any]) -> dict[str, Any]:
    """Drop the rows with a missing value."""
    effect(workdir, "clean", "start")
    keep = ~np.isnan(data["x"]).any(axis=1)
    effect(workdir, "clean", "done")
    return {"x": data["x"][keep], "y": data["y"][keep], "dropped": int((~keep).sum())}


def features(workdir: str, data: dict[str, Any]) -> dict[str, Any]:
    """Standardize and add the pairwise products."""
    effect(workdir, "features", "start")
    x = data["x"]
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    pairs = [z[:, i] * z[:, j] for i in range(4) for j in range(i + 1, 4)]
    out = np.column_stack([np.ones(len(z)), z, *pairs])
    effect(workdir, "features", "done")
    return {"x": out, "y": data["y"]}


def train(workdir: str, data: dict[str, Any], epochs: int, pause: float) -> dict[str, Any]:
    """Logistic regression by gradient descent (``pause`` s per epoch: a long step)."""
    effect(workdir, "train", "start")
    x, y = data["x"], data["y"].astype(np.float64)
    w = np.zeros(x.shape[1])
    losses = []
    for _ in range(epochs):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        losses.append(float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12))))
        w -= 0.5 * x.T @ (p - y) / len(y)
        time.sleep(pause)
    effect(workdir, "train", "done")
    return {"w": w, "losses": np.array(losses)}


def evaluate(workdir: str, data: dict[str, Any], model: dict[str, Any]) -> dict[str, float]:
    """Accuracy and log loss on the data."""
    effect(workdir, "evaluate", "start")
    p = 1.0 / (1.0 + np.exp(-(data["x"] @ model["w"])))
    y = data["y"]
    acc = float(np.mean((p > 0.5) == (y == 1)))
    loss = float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
    effect(workdir, "evaluate", "done")
    return {"accuracy": acc, "loss": loss}


async def pipeline(
    ctx: TaskContext, workdir: str, rows: int = 4000, epochs: int = 40, pause: float = 0.02
) -> dict[str, Any]:
    """The task: five steps, each committed once."""
    raw = await ctx.step("ingest", ingest, workdir, rows, 7)
    ctx.progress(0.2)
    data = await ctx.step("clean", clean, workdir, raw)
    ctx.progress(0.4)
    feats = await ctx.step("features", features, workdir, data)
    ctx.progress(0.6)
    model = await ctx.step("train", train, workdir, feats, epochs, pause)
    ctx.progress(0.8)
    scores = await ctx.step("evaluate", evaluate, workdir, feats, model)
    ctx.progress(1.0)
    return {"rows": len(feats["y"]), "dropped": data["dropped"], "weights": model["w"], **scores}


def counts(workdir: Path) -> dict[str, dict[str, int]]:
    """How often each stage started and finished, from the effects log."""
    out = {s: {"start": 0, "done": 0} for s in STAGES}
    for line in (workdir / "effects.log").read_text().splitlines():
        what, stage, _pid = line.split()
        out[stage][what] += 1
    return out


def same(a: Any, b: Any) -> bool:
    """Equal values, numpy arrays bit for bit."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)


async def kill_mid_train(handle: ProcessHandle, workdir: Path) -> None:
    """SIGKILL the worker once it is inside the train step."""
    log = workdir / "effects.log"

    def inside() -> bool:
        return log.exists() and "start train" in log.read_text()

    while not inside():  # noqa: ASYNC110 (another process writes the log)
        await trio.sleep(0.01)
    print(f"--- kill -9 of worker pid {handle.pid} in the middle of 'train'", flush=True)
    os.kill(handle.pid, signal.SIGKILL)


async def main(scratch: Path, kill: bool) -> int:
    t0 = trio.current_time()

    def show(t: Transition) -> None:
        print(f"[{t.at - t0:5.2f}s] {t.source or '-':>9} -> {t.target:<9} {t.reason} {t.detail}")

    ref_dir, run_dir = scratch / "reference", scratch / "supervised"
    ref_dir.mkdir()
    run_dir.mkdir()
    print("--- reference run, in this process, no failures")
    ref_spec = TaskSpec("resumable_pipeline:pipeline", (str(ref_dir),), task_id="reference")
    ref = unwrap(await TaskRunner(ref_spec, InProcess(ref_spec, MemoryJournal())).run())

    print("--- supervised run, in worker processes" + (", killed once mid-train" if kill else ""))
    spec = TaskSpec("resumable_pipeline:pipeline", (str(run_dir),), task_id="pipeline")
    async with trio.open_nursery() as nursery:

        def started(attempt: int, handle: ProcessHandle) -> None:
            print(f"--- attempt {attempt}: worker pid {handle.pid}", flush=True)
            if kill and attempt == 1:
                nursery.start_soon(kill_mid_train, handle, run_dir)

        result = await run_local(
            spec,
            scratch / "task",
            on_transition=show,
            env={"PYTHONPATH": str(HERE)},
            on_started=started,
        )
    value = unwrap(result)

    print("--- side effects (stage: started / finished)")
    seen = counts(run_dir)
    for stage in STAGES:
        print(f"    {stage:<9} {seen[stage]['start']} / {seen[stage]['done']}")
    equal = same(value, ref)
    once = all(seen[s]["done"] == 1 for s in STAGES)
    print(f"--- accuracy {value['accuracy']:.4f}, loss {value['loss']:.4f}, rows {value['rows']}")
    print(f"--- attempts: {result.attempts}")
    print(f"--- result equals the failure-free run: {'yes' if equal else 'NO'}")
    print(f"--- every finished stage ran once: {'yes' if once else 'NO'}")
    return 0 if equal and once else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-kill", action="store_true", help="run without the kill -9")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(trio.run(main, Path(tmp), not opts.no_kill))
