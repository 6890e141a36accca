"""The demo's training script: a small MLP learns a teacher network's labels, data-parallel
over gloo, snapshotting through `Snapshotter`.

Deterministic by construction (seeded model, seeded data stream captured as ``extra`` state,
fixed thread count), so a run that survived failures ends with the same parameters, bit for
bit, as a run that had none. Run it under ``supervise node`` or standalone (one process)::

    python -m supervise._demo.train --steps 200 --out final.pt

Fault injection for the demo: when ``SUPERVISE_DEMO_FAULTS`` names a directory, a file
``nan-rank<R>`` there makes rank R's next loss NaN once (the file is removed first).
``--log-every N`` prints a JSON progress line (``{"event": "step", ...}``) every N steps and at
the first step of each process, for whoever watches the run (`supervise demo` does).

``--progress FILE`` appends one JSON line per event (process start, rendezvous, restore, every
completed step) so a benchmark can time recoveries from the training side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from supervise.torch.snapshotter import Snapshotter

FAULTS_ENV = "SUPERVISE_DEMO_FAULTS"


class TeacherStream:
    """An endless, seeded stream of (inputs, labels) batches; its position is training state."""

    def __init__(self, *, seed: int, rank: int, batch: int, width: int, classes: int) -> None:
        self.batch = batch
        self.width = width
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        teacher_gen = torch.Generator().manual_seed(seed)  # the same teacher on every rank
        self.teacher = torch.randn(width, classes, generator=teacher_gen)
        self.seen = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.batch, self.width, generator=self.gen)
        y = (x @ self.teacher).argmax(dim=1)
        self.seen += 1
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.gen.get_state(), "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["rng"])
        self.seen = int(state["seen"])


def build_model(width: int, hidden: int, classes: int, seed: int) -> nn.Module:
    """The student: a three-layer MLP with LayerNorm, the same initial weights on every rank."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.LayerNorm(hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, classes),
    )


def _inject_nan(rank: int) -> bool:
    faults = os.environ.get(FAULTS_ENV)
    if not faults:
        return False
    marker = Path(faults) / f"nan-rank{rank}"
    try:
        marker.unlink()
    except FileNotFoundError:
        return False
    return True


def process_start_time() -> float | None:
    """When this process was created (wall clock, 10 ms resolution; Linux), else None."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        return booted + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, AttributeError):
        return None


class Progress:
    """Appends one JSON line per training event to a file shared by every rank and restart
    (``O_APPEND``: each line is one write); a no-op without a path."""

    def __init__(self, path: Path | None, *, rank: int, generation: int) -> None:
        self._fd = None if path is None else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._base = {"rank": rank, "gen": generation, "pid": os.getpid()}

    def event(self, ev: str, **fields: Any) -> None:
        if self._fd is None:
            return
        record = {"ev": ev, "t": time.time(), **self._base, **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _average_gradients(model: nn.Module, world: int) -> None:
    """All-reduce gradients in one flat bucket (what DDP does, minus its hooks)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TeacherStream,
    loss_fn: nn.Module,
    *,
    rank: int,
    world: int,
) -> float:
    """One data-parallel step (forward, backward, gradient all-reduce, optimizer step);
    returns the loss (NaN when the demo's fault injection asked for it)."""
    x, y = data.next()
    loss = loss_fn(model(x), y)
    if _inject_nan(rank):
        loss = loss * float("nan")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        _average_gradients(model, world)
    optimizer.step()
    return float(loss.item())


def loss_value(loss: float) -> float | str:
    """A loss as JSON can carry it (non-finite values as strings)."""
    return loss if math.isfinite(loss) else str(loss)


def _print_progress(rank: int, step: int, loss: float, *, first: bool) -> None:
    line = {"event": "step", "rank": rank, "step": step, "first": first, "loss": loss_value(loss)}
    print(json.dumps(line), flush=True)


def save_final(model: nn.Module, out: Path) -> None:
    """Write the final parameters atomically (what a failure-free run is compared by)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--step-delay", type=float, default=0.0, help="sleep per step (pacing)")
    parser.add_argument("--out", type=Path, help="rank 0 writes the final parameters here")
    parser.add_argument(
        "--log-every", type=int, default=0, help="print a JSON progress line every N steps"
    )
    parser.add_argument("--progress", type=Path, help="append JSON lines of training events here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    progress = Progress(
        args.progress, rank=rank, generation=int(os.environ.get("SUPERVISE_GENERATION", "0"))
    )
    progress.event("main", started=process_start_time())
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    progress.event("rendezvous")

    model = build_model(args.width, args.hidden, args.classes, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = TeacherStream(
        seed=args.seed, rank=rank, batch=args.batch, width=args.width, classes=args.classes
    )
    snap = Snapshotter(model, optimizer, extra={"data": data}, total_steps=args.steps)
    progress.event("ready")
    start = snap.restore()
    restored = snap.last_restore
    progress.event("restored", step=start, seconds=None if restored is None else restored.seconds)
    first = 0 if start is None else start + 1
    loss_fn = nn.CrossEntropyLoss()
    for step in range(first, args.steps):
        loss = train_step(model, optimizer, data, loss_fn, rank=rank, world=world)
        snap.step(step, metrics={"loss": loss})
        progress.event("step", step=step, loss=loss_value(loss))
        if args.log_every > 0 and (step == first or step % args.log_every == 0):
            _print_progress(rank, step, loss, first=step == first)
        if args.step_delay:
            time.sleep(args.step_delay)
    snap.close()
    progress.event("done")
    progress.close()
    if args.out is not None and rank == 0:
        save_final(model, args.out)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
