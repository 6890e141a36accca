"""A test node: transport + membership + ReplicaHolder (a supervision tree) in one OS
process, on loopback.

Started by the real-process tests (several at once), killed with SIGKILL by PID. Each node
owns one rank's shard: deterministic bytes from (rank, version), so any process can check a
fetched copy byte for byte. Prints one JSON line per event on stdout (``ready``, ``fetched``,
``event``) and answers ``test.status`` / ``test.commit`` requests on its own endpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import trio
import xxhash

from supervise import Policy, Supervisor, child, whereis
from supervise.agents.replica_holder import LocalCommit, ReplicaHolder, fetch_shard_via
from supervise.cluster import CurveKeys, Incoming, Transport, TransportLimits, message_kind
from supervise.cluster.failure_detector import DetectorConfig
from supervise.cluster.local import MemoryShards
from supervise.cluster.membership import Membership
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.replication import ReplicaEndpoint
from supervise.cluster.replicator import ReplicationTuning
from supervise.cluster.shard import Check, ShardMeta

TENSORS = 4


def shard_bytes(rank: int, version: int, size: int) -> bytes:
    rng = np.random.default_rng(rank * 1_000_003 + version)
    return rng.integers(0, 256, size, dtype=np.uint8).tobytes()


def shard(rank: int, version: int, size: int) -> tuple[ShardMeta, bytes]:
    data = shard_bytes(rank, version, size)
    step = size // TENSORS
    checks = []
    for i in range(TENSORS):
        lo, hi = i * step, (size if i == TENSORS - 1 else (i + 1) * step)
        checks.append(Check(f"t{i}", lo, hi - lo, xxhash.xxh3_64_intdigest(data[lo:hi])))
    manifest = json.dumps({"rank": rank, "version": version}).encode()
    return ShardMeta(rank, version, 0, size, checks, manifest), data


@message_kind("test.status")
@attrs.frozen(slots=True)
class Status:
    pass


@message_kind("test.status_reply")
@attrs.frozen(slots=True)
class StatusReply:
    local: list[int]  # [version, generation, xxh64 of the data] or []
    replicas: list[tuple[int, int]]  # (rank, version)
    receptions: list[tuple[int, int, int]]  # (rank, version, bytes received)
    live: list[int]
    root: int
    dropped: int
    auth_refused: int
    held_bytes: int
    budget: int


@message_kind("test.commit")
@attrs.frozen(slots=True)
class Commit:
    version: int
    size: int


@message_kind("test.ok")
@attrs.frozen(slots=True)
class Ok:
    pass


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


async def main(args: argparse.Namespace) -> None:
    endpoints = args.nodes.split(",")
    n = len(endpoints)
    rank = args.rank
    curve = CurveKeys.for_node(args.curve, rank) if args.curve else None
    transport = Transport(
        rank=rank,
        endpoint=endpoints[rank],
        peers={r: ep for r, ep in enumerate(endpoints) if r != rank},
        curve=curve,
        limits=TransportLimits(max_frame_size=4 << 20),
    )
    local = MemoryShards([rank])
    store = ReplicaStore(budget=args.budget, keep_last=1)
    tuning = ReplicationTuning(
        chunk_size=args.chunk, window=4, message_timeout=5.0, idle_timeout=args.idle
    )
    if args.slow_chunks:  # make transfers last long enough to kill a sender mid-way
        slow = args.slow_chunks
        original = ReplicaEndpoint._push_chunk

        async def slow_chunk(self: ReplicaEndpoint, msg: Incoming[Any]) -> object:
            await trio.sleep(slow)
            return await original(self, msg)

        ReplicaEndpoint._push_chunk = slow_chunk  # type: ignore[method-assign]

    membership = Membership(
        transport, range(n), DetectorConfig(interval=args.interval, timeout=args.peer_timeout)
    )
    policy = Policy.from_dict({"replication": {"replicas": args.replicas}})
    holder_name = f"replicas-{rank}"
    tree = Supervisor(
        [
            child(transport.serve, id="transport"),
            child(membership.run, id="membership"),
            child(
                ReplicaHolder,
                transport,
                policy,
                local,
                node=rank,
                n_nodes=n,
                ranks_per_node=None,  # open: the tests read replicas back as a client
                membership=membership,
                store=store,
                tuning=tuning,
                id="replicas",
                name=holder_name,
            ),
        ],
        strategy="rest_for_one",
    )

    def holder() -> Any:
        ref = whereis(holder_name)
        if ref is None:
            raise LookupError("the replica holder is not running")
        return ref

    async def status(_: Incoming[Status]) -> StatusReply:
        meta = local.latest(rank)
        mine: list[int] = []
        if meta is not None:
            found = local.get(rank, meta.version)
            assert found is not None
            mine = [meta.version, meta.generation, xxhash.xxh64_intdigest(bytes(found[1]))]
        return StatusReply(
            local=mine,
            replicas=[(r, v) for r, vs in store.inventory().items() for v, _ in vs],
            receptions=[(x.meta.rank, x.meta.version, x.received) for x in store.receptions()],
            live=membership.live(),
            root=membership.root,
            dropped=transport.stats.dropped.total(),
            auth_refused=transport.stats.auth_refused,
            held_bytes=store.held_bytes,
            budget=store.budget,
        )

    async def commit(msg: Incoming[Commit]) -> Ok:
        meta, data = shard(rank, msg.body.version, msg.body.size)
        local.commit(meta, data)
        holder().cast(LocalCommit(rank))
        return Ok()

    transport.handle(Status, status)
    transport.handle(Commit, commit)
    async with trio.open_nursery() as nursery:
        watch = membership.subscribe()

        async def log_events() -> None:
            async for ev in watch:
                emit("event", event=attrs.asdict(ev))

        nursery.start_soon(log_events)
        await nursery.start(tree.run)
        if args.fetch:
            with trio.fail_after(30):
                while True:
                    try:
                        meta = await fetch_shard_via(holder(), rank)
                        break
                    except LookupError as exc:
                        emit("fetch_retry", error=str(exc))
                        await trio.sleep(0.2)
            found = local.get(rank)
            assert found is not None
            expected = shard_bytes(rank, meta.version, meta.nbytes)
            emit(
                "fetched",
                version=meta.version,
                nbytes=meta.nbytes,
                identical=bytes(found[1]) == expected,
            )
            holder().cast(LocalCommit(rank))
        elif args.size:
            meta, data = shard(rank, args.version, args.size)
            local.commit(meta, data)
            holder().cast(LocalCommit(rank))
        emit("ready", endpoint=transport.endpoint, rank=rank)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--nodes", required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--fetch", action="store_true")
    p.add_argument("--curve", type=Path, default=None)
    p.add_argument("--budget", type=int, default=256 << 20)
    p.add_argument("--chunk", type=int, default=256 << 10)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--peer-timeout", type=float, default=3.0)
    p.add_argument("--idle", type=float, default=3.0)
    p.add_argument("--slow-chunks", type=float, default=0.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse(sys.argv[1:]))
