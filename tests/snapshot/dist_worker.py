"""One rank of the collective-capture test: ``python dist_worker.py RANK PORT OUT_DIR``.

Each rank sees its own loss sequence; with ``on_best = "loss"`` a rank alone would capture at
different steps, so the printed steps show whether the decision was made collectively.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from supervise.policy import Policy
from supervise.torch import Snapshotter

rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
dist.init_process_group("gloo", rank=rank, world_size=2)
losses = {0: [5.0, 4.0, 6.0, 7.0, 3.0, 8.0], 1: [5.0, 6.0, 7.0, 2.0, 9.0, 9.0]}[rank]
policy = Policy.from_dict(
    {
        "snapshot": {"every_steps": 0, "on_best": "loss"},
        "persist": {"every_snapshots": 0, "path": f"{out}/ckpt"},
    }
)
snap = Snapshotter(torch.nn.Linear(2, 2), policy=policy, shm_dir=out)
captured = [step for step, loss in enumerate(losses) if snap.step(step, {"loss": loss})]
snap.close()
dist.destroy_process_group()
print(json.dumps(captured))
