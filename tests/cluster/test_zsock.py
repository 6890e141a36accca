"""The trio bridge for zmq sockets: no lost wake-ups with many tasks on one socket."""

from __future__ import annotations

import socket
import time
from typing import Any

import trio
import zmq

from supervise.cluster._zsock import ZSocket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_reader_consuming_the_edge_still_wakes_the_sender() -> None:
    """The sender waits on the FD for a connection; the connection completes while trio is
    busy, and the reader's first EVENTS check (before trio polls the FD) consumes the edge.
    The sender must still be woken: the reader sees POLLOUT and wakes it.
    """
    ctx: zmq.Context[Any] = zmq.Context()
    port = _free_port()
    client = ctx.socket(zmq.DEALER)
    client.linger = 0
    client.setsockopt(zmq.IMMEDIATE, 1)
    client.setsockopt(zmq.RECONNECT_IVL, 20)
    client.connect(f"tcp://127.0.0.1:{port}")
    zc = ZSocket(client)
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    sent = trio.Event()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as n:

                async def send() -> None:
                    await zc.send_multipart([b"hello"])  # no connection yet: waits on the FD
                    sent.set()

                n.start_soon(send)
                await trio.sleep(0.05)
                server.bind(f"tcp://127.0.0.1:{port}")
                time.sleep(0.5)  # block trio: the connection completes, the FD turns readable

                async def read() -> None:
                    await zc.recv_multipart()  # its EVENTS check runs before trio polls

                n.start_soon(read)
                await sent.wait()
                n.cancel_scope.cancel()
        assert server.poll(5000)
        assert server.recv_multipart()[1] == b"hello"
    finally:
        zc.close()
        server.close()
        ctx.term()


async def test_many_senders_small_hwm_ping_pong() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for s in (a, b):
        s.linger = 0
        s.sndhwm = s.rcvhwm = 2
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    za, zb = ZSocket(a), ZSocket(b)
    n_tasks, per_task = 8, 200
    received: list[bytes] = []
    payload = b"x" * 100_000
    with trio.fail_after(30):
        async with trio.open_nursery() as n:

            async def sender(i: int) -> None:
                for _ in range(per_task):
                    await za.send_multipart([payload])

            async def echo() -> None:
                for _ in range(n_tasks * per_task):
                    parts = await zb.recv_multipart()
                    await zb.send_multipart([parts[0]])

            async def collect() -> None:
                for _ in range(n_tasks * per_task):
                    received.append((await za.recv_multipart())[0].bytes)

            n.start_soon(echo)
            n.start_soon(collect)
            for i in range(n_tasks):
                n.start_soon(sender, i)
    assert len(received) == n_tasks * per_task
    za.close()
    zb.close()
    ctx.term()


async def test_close_wakes_waiters() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind("tcp://127.0.0.1:*")
    z = ZSocket(s)
    errors: list[type[BaseException]] = []

    async def wait() -> None:
        try:
            await z.recv_multipart()
        except trio.ClosedResourceError as exc:
            errors.append(type(exc))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(wait)
            n.start_soon(wait)
            await trio.sleep(0.05)
            z.close()
    assert errors == [trio.ClosedResourceError, trio.ClosedResourceError]
    ctx.term()
