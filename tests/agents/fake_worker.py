"""A torch-free training worker for the node agent's tests: speaks the real snapshot protocol
(hello, attach, begin, commit, heartbeat, restore, restored, corrupt) through `AgentClient`,
with a deterministic numpy "model", so a run that survived failures ends with the same state
as one that had none. It starts in a fraction of a second (no torch import).

Faults are files in ``--faults DIR``, each consumed once by the rank it names:
``crash-rank<R>`` (exit 7 at the next step), ``hang-rank<R>`` (stop stepping, stay alive),
``nan-rank<R>`` (the state and the reported loss become NaN), ``exit0-rank<R>`` (exit 0 early).
``--pause-at STEP --pause-s S``: after STEP, every rank runs a long phase of S seconds (an
"evaluation") inside a pause, as `Snapshotter.pause` does.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from supervise.snapshot import protocol as p
from supervise.snapshot.checksum import mismatches
from supervise.snapshot.client import AgentClient
from supervise.snapshot.hashing import digest
from supervise.snapshot.manifest import Layout, Manifest, TensorEntry

SIZE = 1 << 16  # float64 elements: 512 KiB of "model"


def advance(state: np.ndarray, step: int) -> None:
    """One deterministic training step."""
    state *= 0.999
    state += np.sin(np.arange(state.size, dtype=np.float64) * 1e-3 + step)


class Lockstep:
    """A per-step barrier through rank 0 over TCP (MASTER_ADDR/MASTER_PORT), standing in for
    the collectives that keep real data-parallel ranks in step: a dead peer breaks it (the
    survivors exit non-zero, as with gloo) and a hung peer blocks it."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.conns: list[socket.socket] = []
        if world == 1:
            return
        addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        if rank == 0:
            with socket.create_server(addr) as srv:
                srv.settimeout(60)
                while len(self.conns) < world - 1:
                    conn = srv.accept()[0]
                    # a peer says its rank first; a connection that closes without a word (a
                    # spare probing whether the port listens yet) is no peer
                    conn.settimeout(60)
                    if len(conn.recv(8, socket.MSG_WAITALL)) == 8:
                        self.conns.append(conn)
                    else:
                        conn.close()
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.conns = [socket.create_connection(addr, timeout=5)]
                    self.conns[0].sendall(rank.to_bytes(8, "little"))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        for c in self.conns:
            c.settimeout(None)

    def step(self, step: int) -> None:
        msg = step.to_bytes(8, "little")
        if self.rank == 0:
            for c in self.conns:
                if len(c.recv(8, socket.MSG_WAITALL)) < 8:
                    raise ConnectionError("a peer left the barrier")
            for c in self.conns:
                c.sendall(msg)
        elif self.conns:
            self.conns[0].sendall(msg)
            if len(self.conns[0].recv(8, socket.MSG_WAITALL)) < 8:
                raise ConnectionError("rank 0 left the barrier")


def fault(faults: Path | None, kind: str, rank: int) -> bool:
    if faults is None:
        return False
    try:
        (faults / f"{kind}-rank{rank}").unlink()
    except FileNotFoundError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--delay", type=float, default=0.02)
    ap.add_argument("--faults", type=Path)
    ap.add_argument("--pause-at", type=int, default=-1)
    ap.add_argument("--pause-s", type=float, default=0.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rank = int(os.environ["RANK"])
    client = AgentClient(os.environ["SUPERVISE_AGENT"], rank)
    greeting = client.hello(
        p.Hello(
            rank,
            int(os.environ["LOCAL_RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ["SUPERVISE_GENERATION"]),
            os.getpid(),
        )
    )
    every = int(greeting.policy.get("snapshot", {}).get("every_steps", 10)) or 10
    generation = int(os.environ["SUPERVISE_GENERATION"])
    layout = Layout.plan([("state", "float64", (SIZE,))])
    state = np.zeros(SIZE, dtype=np.float64)
    start = 0
    for cand in client.restore("latest"):
        data = cand.slot.arena.data(cand.slot.slot, cand.manifest.nbytes)
        bad = mismatches(cand.manifest, data)
        if bad:
            client.corrupt(cand.info.step, f"checksum mismatch in {bad[0]!r}")
            print(f"rank {rank}: version {cand.info.step} is corrupt", file=sys.stderr)
            return 5
        state[:] = np.frombuffer(data, dtype=np.float64, count=SIZE)
        client.restored(cand.info.step)
        start = cand.info.step + 1
        print(f"rank {rank}: restored step {cand.info.step}", flush=True)
        break
    lockstep = Lockstep(rank, int(os.environ["WORLD_SIZE"]))
    loss = 1.0
    for step in range(start, args.steps):
        if fault(args.faults, "crash", rank):
            print(f"rank {rank}: crashing at step {step}", flush=True)
            os._exit(7)
        if fault(args.faults, "hang", rank):
            print(f"rank {rank}: hanging at step {step}", flush=True)
            while True:
                time.sleep(60)
        if fault(args.faults, "exit0", rank):
            return 0
        lockstep.step(step)
        advance(state, step)
        if fault(args.faults, "nan", rank):
            state[:] = np.nan
        loss = float(np.abs(state).mean())
        if step % every == 0:
            arena = client.attach(layout.nbytes, 1 << 16)
            slot = client.begin()
            if slot is not None:
                view = arena.data(slot.slot, layout.nbytes)
                view[:] = state.tobytes()
                entry = layout.entries[0]
                tensors = (
                    TensorEntry(
                        entry.name,
                        entry.dtype,
                        entry.shape,
                        entry.offset,
                        entry.nbytes,
                        digest(view[: entry.nbytes]),
                    ),
                )
                manifest = Manifest(
                    step,
                    generation,
                    rank,
                    int(os.environ["WORLD_SIZE"]),
                    layout.nbytes,
                    tensors,
                    time.time(),
                    {"loss": loss},
                )
                client.commit(slot, manifest.to_bytes())
        client.heartbeat(step, {"loss": loss})
        if step == args.pause_at:
            client.pause(True)
            print(f"rank {rank}: evaluating after step {step}", flush=True)
            time.sleep(args.pause_s)
            client.pause(False)
        time.sleep(args.delay)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"final-rank{rank}.npy").write_bytes(state.tobytes())
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
