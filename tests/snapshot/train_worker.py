"""A tiny training run for the crash tests: ``python train_worker.py OUT STEPS CRASH_AT OPT``.

Restores if it can, trains to STEPS (snapshot every 2 steps), and either dies with os._exit
right after step CRASH_AT or saves its final state to OUT. With ``HANG_IN_CAPTURE=<step>`` it
writes OUT.hang and sleeps in the middle of that capture's copy (to be killed from outside).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import torch

import supervise.torch._capture as capture_module
from supervise.policy import Policy
from supervise.torch import Snapshotter

out, steps, crash_at, opt_kind = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(8, 16),
    torch.nn.BatchNorm1d(16),
    torch.nn.ReLU(),
    torch.nn.Dropout(0.1),
    torch.nn.Linear(16, 1),
)
if opt_kind == "sgd":
    opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
else:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
policy = Policy.from_dict(
    {
        "snapshot": {"every_steps": 2},
        "retention": {"keep_last": 1},
        "persist": {"every_snapshots": 1, "path": str(out.parent / "ckpt")},
    }
)
hang_step = int(os.environ.get("HANG_IN_CAPTURE", "-1"))
if hang_step >= 0:
    real_run = capture_module._CopyWork.run
    hung = threading.Event()

    def hanging_run(self: capture_module._CopyWork, *, helper: bool) -> None:
        # The first copy of that capture's deferred work never finishes, in whichever thread
        # takes it: the background thread, or the training thread when it reaches the next
        # optimizer step first (on a loaded machine it may do all the copies itself).
        job = snap._capture._job
        if job is not None and job.step == hang_step and job.work is self:
            with self._lock:
                claim = not hung.is_set() and self._next < len(self.items)
                if claim:
                    hung.set()
                    self._next += 1  # taken, never done: the version can never commit
            if claim:  # buffers and RNG are in the slot, parameters not yet
                out.with_suffix(".hang").write_text(str(os.getpid()))
                time.sleep(600)
        real_run(self, helper=helper)

    capture_module._CopyWork.run = hanging_run  # type: ignore[method-assign]

snap = Snapshotter(model, opt, policy=policy, shm_dir=os.environ.get("SHM_DIR"))
start = snap.restore()
print("restored", start, flush=True)
for step in range(0 if start is None else start + 1, steps):
    x = torch.randn(16, 8)
    loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    if snap.step(step, {"loss": loss.item()}):
        print("captured", step, flush=True)  # a capture is skipped while both slots are pinned
    if step == hang_step - 1:
        snap.wait()
        torch.save(model.state_dict(), out.with_suffix(".committed"))
    if step == crash_at:
        snap.flush()  # what was captured is committed (and persisted): the crash loses none
        os._exit(3)
snap.close()
torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "start": start}, out)
