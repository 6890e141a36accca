"""The demo's task: seed 004's five-stage pipeline (ingest, clean, features, train, evaluate).

Deterministic for a seed (numpy only), so a run through a node loss can be compared with a
failure-free one. Every step execution leaves two files named by the step's idempotency key
(``start`` and ``done``, with the attempt, node, worker PID and wall-clock time): the demo
counts executions from them and rebuilds the timeline without asking the farm.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from supervise.tasks import TaskContext

TARGET = "supervise._demo.farm.pipeline:pipeline"
STAGES = ("ingest", "clean", "features", "train", "evaluate")
ROWS = 1500
EPOCHS = 30


def mark_path(effects: Path, key: str, attempt: int, pid: int, what: str) -> Path:
    """The file recording that step ``key`` (attempt, worker pid) ``what`` (start / done)."""
    return effects / f"{key.replace('/', '~')}.a{attempt}.p{pid}.{what}"


def _mark(where: dict[str, Any], what: str) -> None:
    record = {**where, "pid": os.getpid(), "what": what, "t": time.time()}
    path = mark_path(Path(where["effects"]), where["key"], where["attempt"], os.getpid(), what)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _recorded(where: dict[str, Any], pace: float, stage: Callable[..., Any], *args: Any) -> Any:
    """Run ``stage`` as one recorded execution of a step (``where``: the effects directory,
    the step's idempotency key, attempt and node) taking at least ``pace`` seconds."""
    _mark(where, "start")
    t0 = time.monotonic()
    out = stage(*args)
    time.sleep(max(0.0, pace - (time.monotonic() - t0)))
    _mark(where, "done")
    return out


def ingest(seed: int) -> dict[str, Any]:
    """Synthetic rows: 4 features, a linear boundary with noise, 2% of rows with a NaN."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, 4))
    y = x @ np.array([1.5, -2.0, 0.5, 1.0]) + rng.normal(scale=0.5, size=ROWS) > 0
    x[rng.random(ROWS) < 0.02, rng.integers(0, 4)] = np.nan
    return {"x": x, "y": y.astype(np.int8)}


def clean(data: dict[str, Any]) -> dict[str, Any]:
    """Drop the rows with a missing value."""
    keep = ~np.isnan(data["x"]).any(axis=1)
    return {"x": data["x"][keep], "y": data["y"][keep], "dropped": int((~keep).sum())}


def features(data: dict[str, Any]) -> dict[str, Any]:
    """Standardize, add a bias column and the pairwise products."""
    x = data["x"]
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    pairs = [z[:, i] * z[:, j] for i in range(4) for j in range(i + 1, 4)]
    return {"x": np.column_stack([np.ones(len(z)), z, *pairs]), "y": data["y"]}


def train(data: dict[str, Any]) -> dict[str, Any]:
    """Logistic regression by full-batch gradient descent."""
    x, y = data["x"], data["y"].astype(np.float64)
    w = np.zeros(x.shape[1])
    for _ in range(EPOCHS):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        w -= 0.5 * x.T @ (p - y) / len(y)
    return {"w": w}


def evaluate(data: dict[str, Any], model: dict[str, Any]) -> dict[str, float]:
    """Accuracy and log loss."""
    p = 1.0 / (1.0 + np.exp(-(data["x"] @ model["w"])))
    y = data["y"]
    acc = float(np.mean((p > 0.5) == (y == 1)))
    loss = float(-np.mean(y * np.log(p + 1e-12) + (1 - y) * np.log(1 - p + 1e-12)))
    return {"accuracy": acc, "loss": loss}


async def pipeline(ctx: TaskContext, effects: str, seed: int, pace: float = 0.0) -> dict[str, Any]:
    """The task: five steps, each committed once; ``pace``: seconds per step at least."""

    async def step(name: str, stage: Callable[..., Any], *args: Any) -> Any:
        where = {"effects": effects, "key": ctx.key(name), "attempt": ctx.attempt, "node": ctx.node}
        return await ctx.step(name, _recorded, where, pace, stage, *args)

    raw = await step("ingest", ingest, seed)
    ctx.progress(0.2)
    data = await step("clean", clean, raw)
    ctx.progress(0.4)
    feats = await step("features", features, data)
    ctx.progress(0.6)
    model = await step("train", train, feats)
    ctx.progress(0.8)
    scores = await step("evaluate", evaluate, feats, model)
    ctx.progress(1.0)
    return {
        "seed": seed,
        "rows": len(feats["y"]),
        "dropped": data["dropped"],
        "w": model["w"],
        **scores,
    }


def same(a: Any, b: Any) -> bool:
    """Equal values, numpy arrays bit for bit (lists and arrays alike)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
