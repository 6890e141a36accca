"""Who may say what on a transport: a rank speaks on one connection at a time, a kind's
``allow`` rule refuses senders (counted, logged, a one-line error reply), sender ranks are
checked against the cluster, and refused handshakes and cut links are counted."""

from __future__ import annotations

from pathlib import Path

import attrs
import msgpack
import pytest
from clusterkit import eventually

from supervise.cluster import (
    CurveKeys,
    Incoming,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    Transport,
    TransportLimits,
    generate_keys,
    message_kind,
)
from supervise.cluster._wire import MAX_RANK, decode_header, encode_header


@message_kind("test.authz.ping")
@attrs.frozen(slots=True)
class Ping:
    n: int


def _server(**kwargs: object) -> Transport:
    server = Transport(rank=0, endpoint="127.0.0.1:0", **kwargs)  # type: ignore[arg-type]

    async def ping(msg: Incoming[Ping]) -> Ping:
        return Ping(msg.body.n + 1)

    def only_odd(body: Ping, sender: int | None) -> str | None:
        return None if body.n % 2 else f"node {sender} sent an even ping"

    server.handle(Ping, ping, allow=only_odd)
    return server


async def test_an_allow_rule_refuses_counts_and_names_why() -> None:
    server = _server()
    async with server.running():
        assert server.endpoint is not None
        peer = Transport(rank=1, peers={0: server.endpoint})
        async with peer.running():
            assert (await peer.request(0, Ping(1), expect=Ping)).body.n == 2
            with pytest.raises(RemoteError, match="refused: node 1 sent an even ping"):
                await peer.request(0, Ping(2), expect=Ping)
    assert server.stats.refused["test.authz.ping"] == 1
    assert server.stats.handler_errors == 0  # (the first test)


async def test_a_rank_speaks_on_one_connection_at_a_time() -> None:
    server = _server()
    async with server.running():
        assert server.endpoint is not None
        real = Transport(rank=1, peers={0: server.endpoint})
        liar = Transport(rank=1, peers={0: server.endpoint})  # a stranger claiming rank 1
        async with real.running():
            assert (await real.request(0, Ping(1), expect=Ping)).body.n == 2
            async with liar.running():
                with pytest.raises(RemoteError, match="rank 1 already speaks on another"):
                    await liar.request(0, Ping(3), expect=Ping)
            assert (await real.request(0, Ping(5), expect=Ping)).body.n == 6
        itself = Transport(rank=0, peers={0: server.endpoint})  # a node never asks itself
        async with itself.running():
            with pytest.raises(RemoteError, match="claiming this node's own rank 0"):
                await itself.request(0, Ping(9), expect=Ping)
        # the real one's connection closed (libzmq says so): a restarted node 1 speaks again
        await eventually(lambda: server.stats.links_closed >= 3)
        again = Transport(rank=1, peers={0: server.endpoint})
        async with again.running():
            assert (await again.request(0, Ping(7), expect=Ping)).body.n == 8
    assert server.stats.refused["test.authz.ping"] == 2


async def test_a_silent_connection_gives_its_rank_up_after_rebind_after(
    autojump_clock: object,
) -> None:
    # (no close reported: a crashed host) the rank moves once its old link stayed silent
    server = _server(limits=TransportLimits(rebind_after=3.0))
    router = server._router  # the binding rule itself, without sockets
    assert router._speaks_for(1, b"old", 7) is None
    assert router._speaks_for(1, b"new", 8) is not None
    import trio

    await trio.sleep(3.5)
    assert router._speaks_for(1, b"new", 8) is None
    assert router._speaks_for(1, b"old", 7) is not None


async def test_sender_ranks_outside_the_cluster_are_dropped() -> None:
    server = _server(nodes=2)
    async with server.running():
        assert server.endpoint is not None
        stranger = Transport(rank=5, peers={0: server.endpoint})
        async with stranger.running():
            with pytest.raises(RequestTimeout):
                await stranger.request(0, Ping(1), timeout=1.0)
        await eventually(lambda: server.stats.dropped["malformed"] == 1)


@pytest.mark.parametrize("sender", [-5, MAX_RANK + 1, 2**63])
def test_header_rejects_impossible_sender_ranks(sender: int) -> None:
    good = encode_header("k", 3, 0, 0, {}, 0, None)
    assert decode_header(good, 1024).sender == 3
    bad = msgpack.packb({"p": 1, "k": "k", "s": sender, "i": 0, "r": 0, "b": {}, "n": 0})
    with pytest.raises(ProtocolError, match=r"sender rank .* out of range"):
        decode_header(bad, 1024)


async def test_refused_handshakes_and_oversized_messages_are_counted(tmp_path: Path) -> None:
    generate_keys(tmp_path, 2)
    server = _server(
        curve=CurveKeys.for_node(tmp_path, 0), limits=TransportLimits(max_frame_size=4096)
    )
    async with server.running():
        assert server.endpoint is not None
        plain = Transport(rank=1, peers={0: server.endpoint})  # no CURVE: refused
        async with plain.running():
            with pytest.raises(RequestTimeout):
                await plain.request(0, Ping(1), timeout=1.0)
        await eventually(lambda: server.stats.refused["handshake"] >= 1)
        assert server.stats.auth_refused >= 1
        peer = Transport(
            rank=1,
            peers={0: server.endpoint},
            curve=CurveKeys.for_node(tmp_path, 1),
            limits=TransportLimits(max_frame_size=1 << 20),
        )
        async with peer.running():
            assert (await peer.request(0, Ping(1), expect=Ping)).body.n == 2
            closed = server.stats.links_closed
            await peer.send(0, Ping(3), [b"x" * 100_000])  # libzmq cuts the link
            await eventually(lambda: server.stats.links_closed > closed)


async def test_refusals_of_unknown_kinds_share_one_counter_and_log_line() -> None:
    # the kind is the sender's choice: a flood of new names claiming a live rank must not grow
    # the refusal counters (or the metric's attributes, or the log throttle) one entry a name
    import zmq

    server = _server()
    async with server.running():
        assert server.endpoint is not None
        ctx = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(server.endpoint)
        try:
            for i in range(200):  # sender 0: the server's own rank, refused before any lookup
                raw.send(encode_header(f"made.up.{i}", 0, 0, 0, {}, 0, None))
            await eventually(lambda: sum(server.stats.refused.values()) == 200)
        finally:
            raw.close()
            ctx.term()
        assert dict(server.stats.refused) == {"unknown": 200}
        assert len(server._framing._throttle._last) <= 2


async def test_a_closed_link_still_queued_in_the_monitor_frees_its_rank(
    autojump_clock: object,
) -> None:
    # node 1 restarted: libzmq already reported its old link closed, but the reader takes the
    # new connection's first message before the monitor's task ran; it must not be refused
    import struct

    import zmq

    server = _server()
    router = server._router
    assert router._speaks_for(1, b"old", 7) is None

    class _Queued:
        def __init__(self) -> None:
            self.events = [
                [zmq.Frame(struct.pack("=hi", zmq.EVENT_DISCONNECTED, 7)), zmq.Frame(b"tcp://x")]
            ]

        def try_recv_multipart(self) -> list[zmq.Frame] | None:
            return self.events.pop() if self.events else None

    router._monitor = _Queued()  # type: ignore[assignment]
    assert router._speaks_for(1, b"new", 8) is None
    assert server.stats.links_closed == 1
    assert router._speaks_for(1, b"old", 7) is not None  # and the new one holds it now
