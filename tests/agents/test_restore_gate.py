"""A worker's requests held while its rank's shard is fetched: the workers start during the
fetch, a request about a fetched rank (its hello, which may set up the arena the fetch writes,
its restore) is answered once the shard is here; another rank's requests go on meanwhile."""

from __future__ import annotations

from pathlib import Path

import trio
import zmq

from supervise.agents._restore_gate import RestoreGate
from supervise.cluster.ipc import ipc_endpoint, serve_requests
from supervise.snapshot import protocol as p


def _ask(endpoint: str, frames: list[bytes], timeout_ms: int = 5000) -> list[bytes]:
    """Send each frame on its own DEALER, return the replies in the order they came."""
    ctx = zmq.Context()
    try:
        socks = []
        for frame in frames:
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(endpoint)
            s.send(frame)
            socks.append(s)
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        got: list[bytes] = []
        while len(got) < len(socks):
            ready = dict(poller.poll(timeout_ms))
            if not ready:
                break
            for s in socks:
                if s in ready:
                    got.append(s.recv())
                    poller.unregister(s)
        for s in socks:
            s.close()
        return got
    finally:
        ctx.term()


async def test_a_restore_of_a_fetched_rank_waits_for_its_shard_the_rest_goes_on(
    tmp_path: Path,
) -> None:
    gate = RestoreGate()
    gate.close([1])

    def handler(frame: bytes) -> bytes:
        req = p.decode_request(frame).request
        return f"{type(req).__name__} {req.rank}".encode()  # type: ignore[attr-defined]

    endpoint = ipc_endpoint(tmp_path, "agent")
    held = p.encode_request(p.Restore(1, 5), 1)
    other = p.encode_request(p.Restore(0, 5), 2)
    hello = p.encode_request(p.Hello(1, 0, 2, 2, 4321), 3)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda **kw: serve_requests(endpoint, handler, hold=gate.hold, **kw))
        got = await trio.to_thread.run_sync(_ask, endpoint, [held, other, hello], 1000)
        assert got == [b"Restore 0"]  # rank 1's restore and hello wait for its fetch
        gate.open([1])
        later = await trio.to_thread.run_sync(_ask, endpoint, [held], 5000)
        assert later == [b"Restore 1"]
        nursery.cancel_scope.cancel()


def test_nothing_is_decoded_while_nothing_is_fetched() -> None:
    gate = RestoreGate()
    assert gate.hold(b"not even msgpack") is None
    gate.close([0])
    assert gate.hold(b"not even msgpack") is None  # the handler refuses it
    assert gate.hold(p.encode_request(p.Heartbeat(1, 3, {}), 1)) is None  # another rank
    waits = gate.hold(p.encode_request(p.Restore(0, "latest"), 1))
    assert waits is not None
    waits.close()  # type: ignore[attr-defined]  # a coroutine never awaited here
    gate.open()
    assert gate.hold(p.encode_request(p.Restore(0, "latest"), 1)) is None
