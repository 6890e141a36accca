"""The trio bridge for zmq sockets: no lost wake-ups with many tasks on one socket."""

from __future__ import annotations

import select
from typing import Any

import trio
import trio.testing
import zmq
from zmq.utils.monitor import recv_monitor_message

from supervise._testing import free_port, wait_until
from supervise.cluster._zsock import ZSocket


def _block_until_connected(client: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
    """Block the thread (and so trio) until ``client``'s connection completed (its monitor
    reports the handshake) and its FD turned readable; reads nothing from ``client`` itself,
    so the edge on its FD stays for the reader to consume."""

    def handshake() -> bool:
        while monitor.poll(0):
            if recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
        return False

    wait_until(handshake, what="the DEALER's handshake with the ROUTER", timeout_s=10)
    wait_until(
        lambda: select.select([client.FD], [], [], 0)[0],
        what="the DEALER's FD to turn readable",
        timeout_s=10,
    )


async def test_reader_consuming_the_edge_still_wakes_the_sender() -> None:
    """The sender waits on the FD for a connection; the connection completes while trio is
    busy, and the reader's first EVENTS check (before trio polls the FD) consumes the edge.
    The sender must still be woken: the reader sees POLLOUT and wakes it.
    """
    ctx: zmq.Context[Any] = zmq.Context()
    port = free_port()
    client = ctx.socket(zmq.DEALER)
    client.linger = 0
    client.setsockopt(zmq.IMMEDIATE, 1)
    client.setsockopt(zmq.RECONNECT_IVL, 20)
    monitor = client.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
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
                await trio.testing.wait_all_tasks_blocked()  # the sender waits on the FD
                server.bind(f"tcp://127.0.0.1:{port}")
                _block_until_connected(client, monitor)  # trio blocked: it does not poll

                async def read() -> None:
                    await zc.recv_multipart()  # its EVENTS check runs before trio polls

                n.start_soon(read)
                await sent.wait()
                n.cancel_scope.cancel()
        assert server.poll(5000)
        assert server.recv_multipart()[1] == b"hello"
    finally:
        client.disable_monitor()
        monitor.close()
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
            await trio.testing.wait_all_tasks_blocked()  # both wait on the socket
            z.close()
    assert errors == [trio.ClosedResourceError, trio.ClosedResourceError]
    ctx.term()
