"""A farm node for the real-process tests: the agent's transport, arenas (tokens checked) and
`FarmNode`, without a coordinator (the test plays it, so it controls fences and leases).

``python farm_node_proc.py RANK COORD PEERS ENDPOINT... `` (PEERS: comma-separated ranks, or
``-``); each line of ``$FARM_PIDS`` gets ``task pid`` of a task worker as it starts;
``$FARM_POOL_WORKERS``: its warm task workers (default 1; 0: a fresh process per attempt).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import trio

from supervise.agents.farm_node import FarmNode
from supervise.cluster import Transport
from supervise.snapshot.budget import MemoryBudget
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService
from supervise.snapshot.tokens import RankTokens
from supervise.tasks import farm_messages, journal_replica
from supervise.tasks.pool import PoolSettings


async def main(rank: int, coord: int, peers: list[int], endpoints: list[str]) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix=f"farm{rank}-"))
    arenas = ArenaService(
        os.environ["FARM_SHM"],
        rule=RetentionRule(keep_last=1),
        budget=MemoryBudget(1 << 28),
        node=f"farm{rank}",
        pinned_slots=1,
        tokens=RankTokens(),
    )
    transport = Transport(
        rank=rank,
        endpoint=endpoints[rank],
        peers={i: ep for i, ep in enumerate(endpoints) if i != rank},
        kinds=farm_messages.KINDS + journal_replica.KINDS,
        nodes=len(endpoints),
    )
    pids = Path(os.environ["FARM_PIDS"])

    def on_pid(task_id: str, pid: int) -> None:
        with pids.open("a") as f:
            f.write(f"{task_id} {pid}\n")

    node = FarmNode(
        rank=rank,
        link=transport,
        wire=transport,
        arenas=arenas,
        peers=peers,
        coordinator=lambda: coord,
        capacity={"cpu": 1.0, "memory": 0, "gpus": 0},
        run_dir=run_dir,
        worker_shutdown=2.0,
        on_pid=on_pid,
        pool=PoolSettings(workers=int(os.environ.get("FARM_POOL_WORKERS", "1"))),
    )
    try:
        async with transport.running():
            await node.run()
    finally:
        arenas.close()


if __name__ == "__main__":
    rank, coord = int(sys.argv[1]), int(sys.argv[2])
    peers = [] if sys.argv[3] == "-" else [int(x) for x in sys.argv[3].split(",")]
    trio.run(main, rank, coord, peers, sys.argv[4:])
