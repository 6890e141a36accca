"""The node's arena hooks fire on whatever thread commits: a shard loaded from disk commits on
the loader's thread, where the trio-run registry is out of reach; the node hands what needs
it back to the trio thread."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from supervise._testing import free_ports
from supervise._testing.poll import wait_until_async
from supervise.agents.config import NodeConfig
from supervise.agents.node import NodeRuntime
from supervise.agents.replica_holder import REPLICAS, LocalCommit
from supervise.policy import Policy
from supervise.runtime import Server, Supervisor, child
from supervise.snapshot import Layout, Manifest, PersistTier, TensorEntry
from supervise.snapshot.checksum import digests
from supervise.snapshot.client import LocalOwner


def shard(step: int) -> tuple[Manifest, bytearray]:
    layout = Layout.plan([("w", "float32", (64,))])
    data = bytearray((i + step) % 251 for i in range(layout.nbytes))
    sums = digests(layout.entries, memoryview(data))
    tensors = tuple(
        TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes, h)
        for e, h in zip(layout.entries, sums, strict=True)
    )
    manifest = Manifest(
        step=step,
        generation=0,
        rank=0,
        world_size=1,
        nbytes=layout.nbytes,
        tensors=tensors,
        wall_time=float(step),
    )
    return manifest, data


class Recorder(Server):
    """Stands in for the ReplicaHolder: records the casts it gets."""

    async def init(self, got: list[Any]) -> None:
        self.got = got

    def handle_cast(self, message: Any) -> None:
        self.got.append(message)


def commit_local(owner: LocalOwner, step: int) -> None:
    manifest, data = shard(step)
    owner.attach(manifest.nbytes, 1 << 16)
    slot = owner.begin()
    assert slot is not None
    slot.arena.data(slot.slot, manifest.nbytes)[:] = data
    owner.commit(slot, manifest.to_bytes())


async def test_commits_off_the_trio_thread_reach_the_replica_holder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ckpt = tmp_path / "ckpt"
    manifest, data = shard(3)
    PersistTier(ckpt, rank=0, keep=2).write(manifest, memoryview(data))
    config = NodeConfig(
        rank=0,
        nodes=[f"127.0.0.1:{free_ports(1)[0]}"],
        command=["true"],
        policy=Policy.from_dict({"persist": {"path": str(ckpt)}}),
        shm_dir=str(tmp_path / "shm"),
        run_dir=str(tmp_path),
    )
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(
            Supervisor([child(Recorder, got, id=REPLICAS, name=REPLICAS)]).run
        )
        rt = NodeRuntime(config)
        try:
            # a version adopted from disk: committed on the loader's thread, not pushed
            await trio.to_thread.run_sync(rt.context.load_from_disk, 0, 3)
            assert [v.step for v in rt.arenas.versions(0)] == [3]
            # a worker's commit arriving on another thread: pushed, via the trio thread
            await trio.to_thread.run_sync(commit_local, LocalOwner(rt.arenas, 0), 4)
            await wait_until_async(lambda: got, what="the push of version 4", timeout_s=10)
            assert got == [LocalCommit(0)]
        finally:
            rt.close()
            await ref.stop()
    assert "failed" not in caplog.text, caplog.text
    assert "only available inside trio.run" not in caplog.text
