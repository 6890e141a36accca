"""The status-quo training script of `recovery.py`: the demo's model, data and step, but
checkpointed the way users do it today, with ``torch.save`` to local disk every K steps and
``torch.load`` at start (under a torchrun-style launcher that restarts every worker on any
failure).

The same computation as ``supervise._demo.train`` (same model, data stream, optimizer and
``train_step``), so both end with the same parameters, bit for bit. Each rank saves its own
state (the data stream's position differs per rank) as ``step-<N>.rank-<R>.pt``, written to a
temporary file and renamed, keeping the newest two; at start the ranks agree (all-reduce MIN)
on the newest step every rank has, so a crash between two ranks' saves is harmless. A
non-finite loss stops the worker (exit 1) before it can be checkpointed: the launcher then
restarts everyone from the last checkpoint, which is what a NaN check in a training loop does.

    python benchmarks/_torchsave_train.py --steps 300 --ckpt-dir ckpt --every 20
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from supervise._demo.train import (
    Progress,
    TeacherStream,
    build_model,
    loss_value,
    process_start_time,
    save_final,
    train_step,
)

KEEP = 2


def _path(directory: Path, step: int, rank: int) -> Path:
    return directory / f"step-{step:012d}.rank-{rank:05d}.pt"


def _steps_on_disk(directory: Path, rank: int) -> list[int]:
    steps = []
    for p in directory.glob(f"step-*.rank-{rank:05d}.pt"):
        try:
            steps.append(int(p.name.split(".")[0].removeprefix("step-")))
        except ValueError:
            continue
    return sorted(steps)


def _newest_common(directory: Path, rank: int, world: int) -> int:
    """The newest step every rank has on disk (-1: none)."""
    steps = _steps_on_disk(directory, rank)
    mine = steps[-1] if steps else -1
    if world == 1:
        return mine
    t = torch.tensor([mine], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    common = int(t.item())
    if common >= 0 and common not in steps:
        raise RuntimeError(f"rank {rank} has no checkpoint of step {common} (has {steps})")
    return common


def save(
    directory: Path,
    step: int,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TeacherStream,
) -> None:
    state: dict[str, Any] = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": data.state_dict(),
        "rng": torch.get_rng_state(),
    }
    final = _path(directory, step, rank)
    tmp = final.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(final)
    for old in _steps_on_disk(directory, rank)[:-KEEP]:
        _path(directory, old, rank).unlink(missing_ok=True)


def load(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, data: TeacherStream
) -> int:
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    data.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--every", type=int, default=20, help="checkpoint every K steps; 0 = off")
    parser.add_argument(
        "--pg-timeout", type=float, default=1800.0, help="gloo collective timeout (seconds)"
    )
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (pacing)")
    parser.add_argument("--out", type=Path, help="rank 0 writes the final parameters here")
    parser.add_argument("--progress", type=Path, help="append JSON lines of training events here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    generation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) + 1
    progress = Progress(args.progress, rank=rank, generation=generation)
    progress.event("main", started=process_start_time())
    if world > 1:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=args.pg_timeout),
        )
    progress.event("rendezvous")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args.width, args.hidden, args.classes, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = TeacherStream(
        seed=args.seed, rank=rank, batch=args.batch, width=args.width, classes=args.classes
    )
    progress.event("ready")
    first = 0
    if args.every:
        t0 = time.perf_counter()
        common = _newest_common(args.ckpt_dir, rank, world)
        if common >= 0:
            start = load(_path(args.ckpt_dir, common, rank), model, optimizer, data)
            first = start + 1
            progress.event("restored", step=start, seconds=time.perf_counter() - t0)
        else:
            progress.event("restored", step=None)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(first, args.steps):
        loss = train_step(model, optimizer, data, loss_fn, rank=rank, world=world)
        if not math.isfinite(loss):
            progress.event("nan", step=step, loss=loss_value(loss))
            raise SystemExit(f"rank {rank}: non-finite loss {loss} at step {step}")
        progress.event("step", step=step, loss=loss)
        if args.every and (step + 1) % args.every == 0:
            t0 = time.perf_counter()
            save(args.ckpt_dir, step, rank, model, optimizer, data)
            progress.event("saved", step=step, seconds=time.perf_counter() - t0)
        if args.step_delay:
            time.sleep(args.step_delay)
    progress.event("done")
    progress.close()
    if args.out is not None and rank == 0:
        save_final(model, args.out)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
