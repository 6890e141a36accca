"""Data-parallel training that survives failures: the quickstart of README.md.

Run it under one `supervise node` per node (which sets RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, as torchrun does): `supervise node ... -- python quickstart_train.py --steps 2000`.
"""

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from supervise.torch import Snapshotter

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=2000)
total_steps = parser.parse_args().steps

dist.init_process_group("gloo")  # "nccl" on GPUs
rank = dist.get_rank()
torch.manual_seed(0)  # the same data and initial weights on every rank
inputs = torch.randn(4096, 32)
data = TensorDataset(inputs, inputs @ torch.randn(32, 1))
sampler = DistributedSampler(data)
loader = DataLoader(data, batch_size=64, sampler=sampler)
model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

# supervise: the model itself (not the DDP wrapper), the optimizer, the sampler's epoch.
snap = Snapshotter(model, optimizer, extra={"sampler": sampler})
start = snap.restore()  # None on a fresh start; else restores in place and returns the step
print(f"rank {rank}: " + ("fresh start" if start is None else f"resumed after step {start}"))
ddp = DistributedDataParallel(model)

step = 0 if start is None else start + 1
while step < total_steps:
    for x, y in loader:  # after a restore: the restored epoch again, from its start
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        snap.step(step, metrics={"loss": loss.item()})  # heartbeat; captures per the policy
        step += 1
        if step == total_steps:
            break
    sampler.set_epoch(sampler.epoch + 1)

print(f"rank {rank}: finished {total_steps} steps")
snap.close()
dist.destroy_process_group()
