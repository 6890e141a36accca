"""A fake farm network for the control plane's virtual-time tests: every node's `FarmControl`
and a scripted node side in one trio run, messages handed over in memory — each packed as the
real transport packs it first, so a header over its bound (64 KiB) fails here as it does there."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import msgpack
import pytest
import trio
import zmq

from supervise.cluster import _wire
from supervise.cluster._framing import Framing
from supervise.cluster.errors import ProtocolError, RemoteError, RequestTimeout
from supervise.cluster.messages import KindRegistry
from supervise.cluster.transport import DEFERRED, Incoming, Reply, TransportLimits
from supervise.tasks.control import FarmControl
from supervise.tasks.farm_link import FarmLink
from supervise.tasks.farm_messages import KINDS, Ack, Assign, Offer, ResultReply, Stop, TaskList
from supervise.tasks.resources import Resources
from supervise.tasks.table import TaskRecord

_IDS = itertools.count(1)
_FRAMING = Framing(0, TransportLimits(), None, KindRegistry(KINDS))


def on_the_wire(
    message: object,
    frames: Sequence[Any] = (),
    trace: Mapping[str, str] | None = None,
    *,
    reply: bool = False,
) -> None:
    """Pack ``message`` as `Transport` does: ValueError, as there, when its header is over
    ``max_header_size`` (64 KiB) or a payload frame over its bound."""
    flag = _wire.REPLY if reply else _wire.MESSAGE
    _FRAMING.pack(message, 1, flag, list(frames), trace)


class Delays:
    """Messages that reach their handler late: ``delay[(sender, kind)]`` seconds (sender
    None: any) — a loaded process or link, the messages still all arriving, in order."""

    def __init__(self) -> None:
        self.delay: dict[tuple[int | None, type[Any]], float] = {}

    def of(self, sender: int | None, kind: type[Any]) -> float:
        return self.delay.get((sender, kind), self.delay.get((None, kind), 0.0))


class Net:
    """Ranks' handlers and who is down (a down rank neither answers nor is heard)."""

    def __init__(self) -> None:
        self.handlers: dict[int, dict[type[Any], Any]] = {}
        self.pending: dict[int, trio.MemorySendChannel[object]] = {}
        self.down: set[int] = set()
        self.delays = Delays()


class FakeWire:
    def __init__(self, net: Net, rank: int | None) -> None:
        self.net = net
        self._rank = rank
        if rank is not None:
            net.handlers.setdefault(rank, {})

    @property
    def rank(self) -> int | None:
        return self._rank

    def handle(self, kind: type[Any], handler: Any) -> None:
        assert self._rank is not None
        self.net.handlers[self._rank][kind] = handler

    async def request(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
        expect: type[Any] | None = None,
    ) -> Incoming[Any]:
        on_the_wire(message, frames, trace)  # ValueError as the transport's send raises
        rid = next(_IDS)
        send, receive = trio.open_memory_channel[object](1)
        with trio.move_on_after(timeout):
            if peer in self.net.down or self._rank in self.net.down:
                await trio.sleep_forever()
            await trio.sleep(self.net.delays.of(self._rank, type(message)))
            handler = self.net.handlers.get(peer, {}).get(type(message))
            if handler is None:
                raise ProtocolError(f"rank {peer} has no handler for {type(message).__name__}")
            self.net.pending[rid] = send
            incoming: Incoming[Any] = Incoming(
                body=message,
                kind="",
                sender=self._rank,
                frames=tuple(zmq.Frame(bytes(f)) for f in frames),
                trace=dict(trace or {}),
                request_id=rid,
            )
            try:
                out = await handler(incoming)
            except Exception as exc:
                raise RemoteError(type(message).__name__, str(exc)) from None
            if out is DEFERRED:
                out = await receive.receive()
            self.net.pending.pop(rid, None)
            back: tuple[zmq.Frame, ...] = ()
            if isinstance(out, Reply):
                back = tuple(zmq.Frame(bytes(f)) for f in out.frames)
                out = out.body
            try:  # an answer over the bound is an error reply, as the transport's router gives
                on_the_wire(out, back, reply=True)
            except ValueError as exc:
                raise RemoteError(type(message).__name__, f"bad reply: {exc}") from None
            if expect is not None and not isinstance(out, expect):
                raise ProtocolError(f"got {type(out).__name__}")
            return Incoming(body=out, kind="", sender=peer, frames=back, trace={}, request_id=rid)
        self.net.pending.pop(rid, None)
        raise RequestTimeout(f"no reply from {peer}")

    async def reply(
        self,
        request: Incoming[Any],
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        on_the_wire(message, frames, trace, reply=True)  # ValueError, as `Transport.reply`
        send = self.net.pending.get(request.request_id)
        if send is not None:
            send.send_nowait(Reply(message, frames=list(frames)) if frames else message)


class FakeNode:
    """The node side, scripted: takes assignments and stops, and remembers them."""

    def __init__(self, link: FarmLink, accept: bool = True) -> None:
        self.link = link
        self.accept = accept
        self.assigned: list[tuple[Assign, Mapping[str, str]]] = []
        self.stops: list[Stop] = []
        self.drop_stops = 0  # the next N stops fail (a link that drops them)
        link.handle(Assign, self._assign)
        link.handle(Stop, self._stop)

    async def _assign(self, msg: Incoming[Assign]) -> object:
        self.assigned.append((msg.body, msg.trace))
        return Ack(self.accept, "" if self.accept else "full")

    async def _stop(self, msg: Incoming[Stop]) -> object:
        if self.drop_stops > 0:
            self.drop_stops -= 1
            raise RuntimeError("dropped")
        self.stops.append(msg.body)
        return Ack(True)


class Farmlet:
    """``n`` farm nodes on a fake net: controls, scripted node sides, offers."""

    def __init__(self, n: int, *, lease_s: float = 3.0, cpu: float = 2.0) -> None:
        self.net = Net()
        self.n = n
        self.links = [FarmLink(FakeWire(self.net, r)) for r in range(n)]
        self.live = set(range(n))
        self.controls = [
            FarmControl(
                link,
                leader=self._leader,
                live=lambda: sorted(self.live),
                lease_s=lease_s,
                clock=trio.current_time,
                request_timeout=1.0,
            )
            for link in self.links
        ]
        self.nodes = [FakeNode(link) for link in self.links]
        self.cpu = cpu

    def _leader(self) -> int | None:
        return min(self.live) if self.live else None

    @property
    def coordinator(self) -> FarmControl:
        return self.controls[min(self.live)]

    async def start(self, nursery: trio.Nursery) -> None:
        for c in self.controls:
            await nursery.start(c.run)
        for r in range(self.n):
            await self.offer(r)

    async def offer(self, rank: int, cpu: float | None = None, labels: list[str] = ()) -> None:  # type: ignore[assignment]
        cap = Resources(self.cpu if cpu is None else cpu, 1 << 30, 0).to_json()
        await self.links[rank].request(min(self.live), Offer(rank, cap, list(labels)), expect=Ack)

    def kill(self, rank: int) -> None:
        self.live.discard(rank)
        self.net.down.add(rank)

    def client(self) -> FarmLink:
        return FarmLink(FakeWire(self.net, None))


def unwrap(got: Incoming[Any]) -> Any:
    """A reply as one message: a `TaskList` or `ResultReply` with its payload folded back in."""
    body = got.body
    blob = bytes(got.buffers[0]) if got.buffers else None
    if isinstance(body, TaskList) and blob is not None:
        return TaskList([*body.tasks, *msgpack.unpackb(blob, raw=False)])
    if isinstance(body, ResultReply) and blob is not None:
        return attrs.evolve(body, result=blob)
    return body


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every record `TaskRecord.from_bytes` decodes from now on (the test's monkeypatch
    undoes it), for tests of what a replica decodes and when."""
    decoded: list[bytes] = []
    real = TaskRecord.from_bytes

    def counting(data: bytes) -> TaskRecord:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(TaskRecord, "from_bytes", staticmethod(counting))
    return decoded
