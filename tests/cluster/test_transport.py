"""Transport: typed request/reply, zero-copy frames, limits, malformed input, trace context."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import msgpack
import pytest
import structlog.testing
import trio
import zmq
from clusterkit import eventually
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import supervise.telemetry.lifecycle as telemetry_setup
from supervise.cluster import (
    DEFERRED,
    Incoming,
    PeerUnknown,
    ProtocolError,
    RemoteError,
    Reply,
    RequestTimeout,
    Transport,
    TransportLimits,
    message_kind,
)
from supervise.cluster._zsock import ZSocket
from supervise.cluster.errors import Declined
from supervise.telemetry import Attr, Metric, Telemetry, TelemetryConfig


@message_kind("test.echo")
@attrs.frozen(slots=True)
class Echo:
    text: str
    n: int = 0
    tags: list[str] = attrs.field(factory=list)


@message_kind("test.note")
@attrs.frozen(slots=True)
class Note:
    seq: int


@message_kind("test.positive")
@attrs.frozen(slots=True)
class Positive:
    value: int = attrs.field(validator=attrs.validators.gt(0))


@message_kind("test.boom")
@attrs.frozen(slots=True)
class Boom:
    why: str


@pytest.fixture
async def server() -> AsyncIterator[Transport]:
    t = Transport(rank=0, endpoint="127.0.0.1:0")
    notes: list[int] = []

    async def echo(msg: Incoming[Echo]) -> Reply:
        return Reply(
            Echo(msg.body.text.upper(), msg.body.n + 1, [*msg.body.tags, *msg.trace.values()]),
            frames=msg.frames,
        )

    async def note(msg: Incoming[Note]) -> None:
        notes.append(msg.body.seq)

    async def boom(msg: Incoming[Boom]) -> Echo:
        raise RuntimeError(msg.body.why)

    async def positive(msg: Incoming[Positive]) -> Positive:
        return msg.body

    t.handle(Echo, echo)
    t.handle(Note, note)
    t.handle(Boom, boom)
    t.handle(Positive, positive)
    t.notes = notes  # type: ignore[attr-defined]
    async with t.running():
        yield t


@pytest.fixture
async def client(server: Transport) -> AsyncIterator[Transport]:
    assert server.endpoint is not None
    c = Transport(rank=1, endpoint="127.0.0.1:0", peers={0: server.endpoint})
    async with c.running():
        yield c


async def test_request_reply_with_frames_and_trace(server: Transport, client: Transport) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, sent zero-copy
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    r = await client.request(0, Echo("hi", 1, ["a"]), [big, b"tail"], trace=trace, expect=Echo)
    assert r.body == Echo("HI", 2, ["a", trace["traceparent"]])
    assert r.sender == 0
    assert [bytes(b) for b in r.buffers] == [big, b"tail"]
    assert r.nbytes == len(big) + 4


async def test_one_way_messages_arrive_in_order(server: Transport, client: Transport) -> None:
    for i in range(200):
        await client.send(0, Note(i))
    # a request on the same link is handled after every message sent before it
    await client.request(0, Echo("sync"))
    assert server.notes == list(range(200))  # type: ignore[attr-defined]


async def test_many_concurrent_requests_and_sends(server: Transport, client: Transport) -> None:
    payload = b"x" * (256 * 1024)
    results: list[int] = []

    async def ask(i: int) -> None:
        r = await client.request(0, Echo("x", i), [payload], timeout=30)
        results.append(r.body.n)

    async def spam() -> None:
        for i in range(300):
            await client.send(0, Note(i), [payload], timeout=30)

    async with trio.open_nursery() as n:
        n.start_soon(spam)
        for i in range(100):
            n.start_soon(ask, i)
    assert sorted(results) == list(range(1, 101))


async def test_handler_error_becomes_remote_error(server: Transport, client: Transport) -> None:
    with pytest.raises(RemoteError, match="RuntimeError: kaput"):
        await client.request(0, Boom("kaput"))
    assert server.stats.handler_errors == 1
    assert (await client.request(0, Echo("still alive"))).body.text == "STILL ALIVE"


async def test_a_declined_request_is_an_answer_not_a_handler_failure(
    server: Transport, client: Transport
) -> None:
    class Stale(Declined):
        pass

    async def declining(msg: Incoming[Note]) -> Note:
        raise Stale(f"note {msg.body.seq} is older than the held one")

    server.handle(Note, declining)
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(RemoteError, match="Stale: note 3 is older than the held one"):
            await client.request(0, Note(3))
    assert server.stats.handler_errors == 0
    # the caller decides what a no means: the server neither warns nor logs an error
    assert [x for x in logs if x["log_level"] not in ("debug", "info")] == []
    assert [x["event"] for x in logs if x["log_level"] == "debug"] == ["request declined"]


async def test_unknown_kind_and_bad_body_are_refused(server: Transport, client: Transport) -> None:
    @message_kind("test.nobody")
    @attrs.frozen(slots=True)
    class Nobody:
        x: int

    with pytest.raises(RemoteError, match="no handler"):
        await client.request(0, Nobody(1))
    with pytest.raises(ValueError, match="value"):
        Positive(0)  # the sender cannot even build it ...
    # ... but a hand-made header can carry it: the receiver's validators refuse it
    bad = object.__new__(Positive)
    object.__setattr__(bad, "value", -1)
    with pytest.raises(RemoteError, match="bad body"):
        await client.request(0, bad)
    assert server.stats.dropped["malformed"] == 1
    assert server.stats.dropped["unhandled"] == 1


async def test_expect_checks_reply_kind(server: Transport, client: Transport) -> None:
    with pytest.raises(ProtocolError, match=r"expected test\.note"):
        await client.request(0, Echo("x"), expect=Note)


async def test_request_to_absent_peer_times_out(autojump_clock: Any) -> None:
    c = Transport(rank=1, peers={0: "127.0.0.1:1"})  # nothing listens there
    async with c.running():
        with pytest.raises(RequestTimeout, match=r"no reply from rank 0 to test\.echo within 3s"):
            await c.request(0, Echo("x"), timeout=3)
        assert c.try_send(0, Note(1)) is False  # never queued behind a dead link
        with pytest.raises(PeerUnknown, match="rank 7"):
            await c.request(7, Echo("x"))


async def test_deferred_reply(client: Transport, server: Transport) -> None:
    @message_kind("test.slow")
    @attrs.frozen(slots=True)
    class Slow:
        n: int

    async with trio.open_nursery() as nursery:

        async def slow(msg: Incoming[Slow]) -> object:
            async def later() -> None:
                await trio.sleep(0.01)
                await server.reply(msg, Slow(msg.body.n * 2))

            nursery.start_soon(later)
            return DEFERRED

        server.handle(Slow, slow)
        r = await client.request(0, Slow(21), expect=Slow)
        assert r.body.n == 42


async def test_sender_refuses_oversized_frames() -> None:
    t = Transport(rank=0, peers={1: "127.0.0.1:1"}, limits=TransportLimits(max_frame_size=4096))
    async with t.running():
        with pytest.raises(ValueError, match="payload frame 0 is 5000 bytes, max_frame_size"):
            t.try_send(1, Note(1), [b"x" * 5000])
        with pytest.raises(ValueError, match=r"header is .* bytes, max_header_size"):
            t.try_send(1, Echo("x" * 70_000))


def _header(**over: Any) -> bytes:
    h: dict[str, Any] = {"p": 1, "k": "test.echo", "s": 5, "i": 0, "r": 0, "b": {"text": "x"}}
    h["n"] = 0
    h.update(over)
    for k in [k for k, v in h.items() if v is _DEL]:
        del h[k]
    out: bytes = msgpack.packb(h, use_bin_type=True)
    return out


_DEL = object()


async def test_malformed_messages_are_dropped_and_counted() -> None:
    limits = TransportLimits(max_frame_size=128 * 1024, max_frames=4)
    server = Transport(rank=0, endpoint="127.0.0.1:0", limits=limits)
    seen: list[str] = []

    async def echo(msg: Incoming[Echo]) -> Echo:
        seen.append(msg.body.text)
        return msg.body

    server.handle(Echo, echo)
    async with server.running():
        assert server.endpoint is not None
        ctx: zmq.Context[Any] = zmq.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(server.endpoint)
        evil = ZSocket(raw)
        garbage: list[list[bytes]] = [
            [b"\xc1not msgpack"],  # invalid msgpack
            [msgpack.packb([1, 2, 3])],  # not a map
            [_header(p=99)],  # unknown protocol version
            [_header(k=_DEL)],  # no kind
            [_header(s="zero")],  # sender is not a rank
            [_header(i=-4)],  # bad request id
            [_header(r=1)],  # a reply without a request id
            [_header(n=2), b"only one"],  # truncated: fewer frames than announced
            [_header(n=0), b"extra"],  # more frames than announced
            [_header(n=5), b"1", b"2", b"3", b"4", b"5"],  # too many frames
            [_header(b={"text": 5})],  # wrong body type
            [_header(b=[1])],  # body not a map
            [_header(t={"traceparent": 7})],  # trace context not strings
            [_header(b={"text": "y" * 70_000})],  # header too big
            [_header(r=1, i=3)],  # a reply sent to a server socket
            [],  # nothing at all: libzmq refuses to send; skipped below
        ]
        for parts in garbage:
            if parts:
                await evil.send_multipart(parts)
        # an oversized frame makes libzmq drop the connection (MAXMSGSIZE) ...
        await evil.send_multipart([_header(n=1), b"z" * (256 * 1024)])
        # ... and a good peer is served all along
        good = Transport(rank=1, peers={0: server.endpoint})
        async with good.running():
            await eventually(lambda: server.stats.dropped.total() >= len(garbage) - 1)
            r = await good.request(0, Echo("fine"), expect=Echo)
            assert r.body.text == "fine"
        evil.close()
        ctx.term()
    assert seen == ["fine"]
    assert server.stats.dropped["malformed"] == len(garbage) - 2
    assert server.stats.dropped["unexpected_reply"] == 1


async def test_unhandle_leaves_a_newer_handler_alone(server: Transport, client: Transport) -> None:
    async def old(msg: Incoming[Note]) -> None:
        pass

    async def new(msg: Incoming[Note]) -> None:
        pass

    server.handle(Note, old)
    server.handle(Note, new)  # a restarted service installs its own
    server.unhandle(Note, old)  # the old one's cleanup runs late
    assert server._router._handlers["test.note"] is new
    server.unhandle(Note, new)
    assert "test.note" not in server._router._handlers


# ---- payload received straight into place ------------------------------------------------


@message_kind("test.blob")
@attrs.frozen(slots=True)
class Blob:
    offset: int


async def test_into_hook_receives_the_first_frame_in_place(
    server: Transport, client: Transport
) -> None:
    area = bytearray(64)
    got: list[Incoming[Blob]] = []

    def into(body: Blob, sender: int | None) -> memoryview | None:
        assert sender == 1
        return memoryview(area)[body.offset : body.offset + 16] if body.offset >= 0 else None

    async def blob(msg: Incoming[Blob]) -> Blob:
        got.append(msg)
        return msg.body

    server.handle(Blob, blob, into=into)
    await client.request(0, Blob(8), [b"0123456789", b"rest"])
    assert bytes(area[8:18]) == b"0123456789" and not any(area[:8]) and not any(area[18:])
    msg = got[-1]
    assert [bytes(b) for b in msg.placed] == [b"0123456789"]
    assert [f.bytes for f in msg.frames] == [b"rest"]
    assert [bytes(b) for b in msg.buffers] == [b"0123456789", b"rest"] and msg.nbytes == 14
    # the hook may decline: then the payload arrives as zero-copy frames
    await client.request(0, Blob(-1), [b"abc"])
    assert got[-1].placed == () and [f.bytes for f in got[-1].frames] == [b"abc"]
    # a frame larger than its destination drops the message; a request learns why
    with pytest.raises(RemoteError, match="payload frame 0 is 17 bytes, its destination holds 16"):
        await client.request(0, Blob(0), [b"x" * 17])
    assert server.stats.dropped["malformed"] == 1 and len(got) == 2
    server.unhandle(Blob)
    assert "test.blob" not in server._router._placers


async def test_failing_into_hook_is_an_error_reply(server: Transport, client: Transport) -> None:
    def into(body: Blob, sender: int | None) -> memoryview | None:
        raise KeyError("no room")

    async def blob(msg: Incoming[Blob]) -> Blob:
        raise AssertionError("never handled")

    server.handle(Blob, blob, into=into)
    with pytest.raises(RemoteError, match="KeyError"):
        await client.request(0, Blob(0), [b"data"])
    assert server.stats.handler_errors == 1
    assert (await client.request(0, Echo("alive"))).body.text == "ALIVE"


async def test_submit_into_receives_the_reply_in_place(
    server: Transport, client: Transport
) -> None:
    dest = bytearray(8)
    r = await client.request(0, Echo("x"), [b"abcd"], into=memoryview(dest)[2:6], expect=Echo)
    assert bytes(dest) == b"\0\0abcd\0\0" and r.frames == ()
    assert [bytes(b) for b in r.placed] == [b"abcd"]
    with pytest.raises(ProtocolError, match="payload frame 0 is 4 bytes, its destination holds 3"):
        await client.request(0, Echo("x"), [b"wxyz"], into=memoryview(dest)[0:3])
    assert client.stats.dropped["malformed"] == 1


async def test_a_late_reply_never_writes_into_a_released_destination(
    server: Transport, client: Transport
) -> None:
    release = trio.Event()

    async def held(msg: Incoming[Blob]) -> object:
        async def later() -> None:
            await release.wait()
            await server.reply(msg, Blob(0), [b"late"])

        server.spawn(later)
        return DEFERRED

    server.handle(Blob, held)
    dest = bytearray(4)
    pending = await client.submit(0, Blob(0), into=memoryview(dest))
    with pytest.raises(RequestTimeout):
        await pending.wait(0.05)
    release.set()
    await eventually(lambda: client.stats.dropped["late_reply"] == 1)
    assert bytes(dest) == b"\0\0\0\0"


async def test_destinations_must_be_writable_contiguous_bytes(
    server: Transport, client: Transport
) -> None:
    import array

    server.handle(Blob, _echo_blob, into=lambda body, sender: memoryview(b"read-only"))
    with pytest.raises(RemoteError, match="writable, contiguous"):
        await client.request(0, Blob(0), [b"data"])
    words = array.array("I", [0, 0])  # 4-byte items: received as 8 plain bytes
    server.handle(Blob, _echo_blob, into=lambda body, sender: memoryview(words))
    await client.request(0, Blob(0), [b"\x01\0\0\0\x02\0\0\0"])
    assert list(words) == [1, 2]
    with pytest.raises(TypeError, match="writable, contiguous"):
        await client.submit(0, Blob(0), into=memoryview(bytearray(8))[::2])
    assert (await client.request(0, Echo("alive"))).body.text == "ALIVE"


async def _echo_blob(msg: Incoming[Blob]) -> Blob:
    return msg.body


@pytest.fixture
def late_replies(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[[], dict[tuple[str, str], int]]]:
    """This process's telemetry kept in memory; returns a reader of the late-reply counter
    as {(message kind, reason): count}."""
    reader = InMemoryMetricReader()
    tel = Telemetry.create(TelemetryConfig(), rank=1, metric_readers=[reader])
    monkeypatch.setattr(telemetry_setup._process, "current", tel)

    def counts() -> dict[tuple[str, str], int]:
        data = reader.get_metrics_data()
        out: dict[tuple[str, str], int] = {}
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == Metric.LATE_REPLIES.name:
                        for p in metric.data.data_points:
                            a = p.attributes or {}
                            out[str(a[Attr.MESSAGE_KIND]), str(a[Attr.REASON])] = int(p.value)
        return out

    yield counts
    tel.shutdown()


async def test_late_replies_are_counted_by_why_their_request_was_given_up(
    server: Transport, client: Transport, late_replies: Callable[[], dict[tuple[str, str], int]]
) -> None:
    release = trio.Event()

    async def held(msg: Incoming[Blob]) -> object:
        async def later() -> None:
            await release.wait()
            await server.reply(msg, Blob(msg.body.offset))

        server.spawn(later)
        return DEFERRED

    server.handle(Blob, held)
    with structlog.testing.capture_logs() as logs:
        timed_out = await client.submit(0, Blob(1))
        with pytest.raises(RequestTimeout):
            await timed_out.wait(0.05)
        cancelled = await client.submit(0, Blob(2))  # e.g. a push to a peer found lost
        with trio.move_on_after(0.05):
            await cancelled.wait(30.0)
        abandoned = await client.submit(0, Blob(3))
        abandoned.cancel()
        release.set()
        await eventually(lambda: client.stats.dropped["late_reply"] == 3)
    assert late_replies() == {("test.blob", "timed_out"): 1, ("test.blob", "cancelled"): 2}
    # Nothing was lost: no warning; the timed-out one says so at info (a timeout too short).
    assert [x["log_level"] for x in logs if x["log_level"] not in ("debug", "info")] == []
    late = sorted(x["reason"] for x in logs if x["event"] == "late reply dropped")
    assert late == ["cancelled", "cancelled", "timed_out"]
