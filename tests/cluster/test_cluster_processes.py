"""Real node processes on loopback: replicate, kill -9, replace, kill mid-transfer, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from clusterkit import NodeProcs
from node_main import Commit, Ok, Status, StatusReply, shard_bytes

from supervise._testing.poll import wait_until_async
from supervise.cluster import CurveKeys, RequestTimeout, Transport, generate_keys
from supervise.cluster.replication import fetch_shard

pytestmark = pytest.mark.slow

MiB = 1 << 20


@pytest.fixture
def procs_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[NodeProcs] = []

    def make(n: int) -> NodeProcs:
        p = NodeProcs(tmp_path, n)
        made.append(p)
        return p

    yield make
    for p in made:
        p.cleanup()


def client_for(procs: NodeProcs, curve: CurveKeys | None = None) -> Transport:
    t = Transport(rank=None, peers=dict(enumerate(procs.endpoints)), curve=curve)
    t.kinds.register(Status, StatusReply, Commit, Ok)
    return t


async def status(client: Transport, rank: int) -> StatusReply:
    reply = await client.request(rank, Status(), expect=StatusReply, timeout=5)
    body: StatusReply = reply.body
    return body


async def wait_status(
    client: Transport,
    rank: int,
    pred: Any,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> StatusReply:
    last: list[StatusReply] = []

    async def check() -> StatusReply | None:
        try:
            st = await status(client, rank)
        except RequestTimeout:
            return None
        last[:] = [st]
        return st if pred(st) else None

    return await wait_until_async(
        check,
        what=f"node {rank}'s status to meet the condition",
        timeout_s=timeout,
        details=lambda: f"last status {last}",
    )


async def test_replicate_kill_root_and_replace_it(procs_factory: Any) -> None:
    n, size = 4, 2 * MiB
    procs: NodeProcs = procs_factory(n)
    for r in range(n):
        procs.start(r, "--size", str(size), "--version", "1")
    for r in range(n):
        await procs.wait_line(r, "ready")
    client = client_for(procs)
    async with client.running():
        # group placement, m=2: groups {0,1} and {2,3}; each holds its partner's shard
        for r in range(n):
            await wait_status(client, r, lambda st, r=r: st.replicas == [(r ^ 1, 1)])
        for r in range(n):
            assert (await status(client, r)).root == 0

        procs.kill(0)  # kill -9 the root
        for r in (1, 2, 3):
            st = await wait_status(client, r, lambda st: 0 not in st.live and st.root == 1)
            assert st.live == [1, 2, 3]
        # node 1 still holds the dead node's shard, verified and intact
        _, data = await fetch_shard(client, 1, 0)
        assert bytes(data) == shard_bytes(0, 1, size)

        procs.start(0, "--fetch")  # the replacement: same rank, empty RAM
        fetched = await procs.wait_line(0, "fetched")
        assert fetched == {"kind": "fetched", "version": 1, "nbytes": size, "identical": True}
        await procs.wait_line(0, "ready")
        for r in range(n):
            await wait_status(client, r, lambda st: st.root == 0 and st.live == [0, 1, 2, 3])
        # node 1 saw a new incarnation and pushed its shard to the replacement again
        await wait_status(client, 0, lambda st: st.replicas == [(1, 1)])
        # and the replacement pushes its own newer versions to its group peer as before
        await client.request(0, Commit(version=2, size=size), expect=Ok)
        await wait_status(client, 1, lambda st: st.replicas == [(0, 2)])
        _, data = await fetch_shard(client, 1, 0)
        assert bytes(data) == shard_bytes(0, 2, size)


async def test_kill_mid_transfer_never_serves_a_partial_version(procs_factory: Any) -> None:
    procs: NodeProcs = procs_factory(2)
    small, big = 512 * 1024, 8 * MiB
    procs.start(0, "--size", str(small), "--version", "1")
    procs.start(1, "--slow-chunks", "0.05", "--idle", "2")  # 32 chunks: 1.6 s per transfer
    for r in (0, 1):
        await procs.wait_line(r, "ready")
    client = client_for(procs)
    async with client.running():
        await wait_status(client, 1, lambda st: st.replicas == [(0, 1)])
        await client.request(0, Commit(version=2, size=big), expect=Ok)
        await wait_status(
            client, 1, lambda st: any(v == 2 and got > 0 for _, v, got in st.receptions)
        )
        procs.kill(0)  # the sender dies mid-transfer
        st = await status(client, 1)
        assert st.replicas == [(0, 1)]  # only the complete, verified version is servable
        _, data = await fetch_shard(client, 1, 0)
        assert bytes(data) == shard_bytes(0, 1, small)
        # the partial reception is dropped once idle; its memory is reused, never served
        st = await wait_status(client, 1, lambda st: st.receptions == [])
        assert st.replicas == [(0, 1)] and st.held_bytes <= st.budget
        with pytest.raises(Exception, match="no replica of rank 0 at version 2"):
            await fetch_shard(client, 1, 0, version=2)
    assert procs.alive(1)


def _garbage() -> list[list[bytes]]:
    ok = {"p": 1, "k": "test.status", "s": None, "i": 7, "r": 0, "b": {}, "n": 0}
    return [
        [b"\xc1\xc1 not msgpack"],
        [msgpack.packb([1, 2, 3])],
        [msgpack.packb({**ok, "p": 2})],
        [msgpack.packb({**ok, "n": 3}), b"a"],  # truncated
        [msgpack.packb({**ok, "k": "no.such.kind"})],
        [msgpack.packb({**ok, "b": {"x": 1}, "k": "test.commit"})],  # bad body
        [msgpack.packb(ok), b"z" * (5 * MiB)],  # oversized frame: libzmq drops the link
    ]


async def test_malformed_frames_are_dropped_nothing_lost(procs_factory: Any) -> None:
    procs: NodeProcs = procs_factory(2)
    for r in (0, 1):
        procs.start(r, "--size", str(MiB))
    for r in (0, 1):
        await procs.wait_line(r, "ready")
    client = client_for(procs)
    async with client.running():
        await wait_status(client, 1, lambda st: st.replicas == [(0, 1)])
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            for parts in _garbage():
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 1000
                sock.connect(f"tcp://{procs.endpoints[1]}")
                sock.send_multipart(parts)
                sock.close()
        finally:
            ctx.term()
        st = await wait_status(client, 1, lambda st: st.dropped >= 6)
        assert st.replicas == [(0, 1)]  # nothing lost
        _, data = await fetch_shard(client, 1, 0)
        assert bytes(data) == shard_bytes(0, 1, MiB)
        # and replication goes on
        await client.request(0, Commit(version=2, size=MiB), expect=Ok)
        await wait_status(client, 1, lambda st: st.replicas == [(0, 2)])
    assert procs.alive(0) and procs.alive(1)


async def test_curve_refuses_unauthenticated_peers(procs_factory: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, 3)
    procs: NodeProcs = procs_factory(3)
    for r in range(3):
        procs.start(r, "--size", str(MiB), "--curve", str(keys), "--replicas", "3")
    for r in range(3):
        await procs.wait_line(r, "ready")
    client = client_for(procs, CurveKeys.load(keys, "client"))
    async with client.running():
        for r in range(3):
            await wait_status(
                client,
                r,
                lambda st, r=r: sorted(st.replicas) == [(x, 1) for x in range(3) if x != r],
            )
        # a stranger with valid CURVE keys that are not in the key directory
        other = tmp_path / "other"
        generate_keys(other, 1)
        stranger_keys = CurveKeys.load(other, "client")
        stranger_keys = CurveKeys(
            name="client",
            public=stranger_keys.public,
            secret=stranger_keys.secret,
            known={"node-0": CurveKeys.load(keys, "client").known["node-0"]},
        )
        stranger = client_for(procs, stranger_keys)
        plain = client_for(procs)  # no CURVE at all
        async with stranger.running(), plain.running():
            with pytest.raises(RequestTimeout):
                await stranger.request(0, Status(), expect=StatusReply, timeout=1.0)
            with pytest.raises(RequestTimeout):
                await plain.request(0, Status(), expect=StatusReply, timeout=1.0)
            # a forged "commit" from the stranger never arrives either
            stranger.try_send(0, Commit(version=99, size=10))
        st = await wait_status(client, 0, lambda st: st.auth_refused >= 1)
        assert st.local[0] == 1  # nothing changed
        await client.request(0, Commit(version=2, size=MiB), expect=Ok)
        for r in (1, 2):
            await wait_status(client, r, lambda st: (0, 2) in st.replicas)
    assert all(procs.alive(r) for r in range(3))
