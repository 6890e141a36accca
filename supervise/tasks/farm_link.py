"""`FarmLink`: the transport as the farm's two sides use it, with a loopback to this node's
own rank (the coordinator is a farm node too, and the transport refuses a message claiming
its own rank): a request to ``rank`` itself calls the local handler directly.

Both the coordinator side (`FarmControl`) and the node side register their ``farm.*`` handlers
on one `FarmLink` per agent and send through it, so an `Assign` to the coordinator's own node
or an `Update` from it takes the same path as any other.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import trio
import zmq

from supervise.cluster.errors import ProtocolError, RemoteError, RequestTimeout
from supervise.cluster.transport import DEFERRED, Incoming, Reply

T = TypeVar("T")
Handler = Callable[[Incoming[Any]], Awaitable[object]]


class Wire(Protocol):
    """What `FarmLink` needs of a transport (`supervise.cluster.Transport` has it)."""

    @property
    def rank(self) -> int | None: ...

    def handle(self, kind: type[Any], handler: Handler) -> None: ...

    async def request(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
        expect: type[Any] | None = None,
    ) -> Incoming[Any]: ...

    async def reply(
        self,
        request: Incoming[Any],
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
    ) -> None: ...


_LOCAL_IDS = itertools.count(1)


def _frames(frames: Sequence[Any]) -> tuple[zmq.Frame, ...]:
    """Payload handed over in process, as the transport hands it (zmq frames)."""
    return tuple(f if isinstance(f, zmq.Frame) else zmq.Frame(bytes(f)) for f in frames)


class FarmLink:
    """A transport plus a loopback to its own rank."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self._handlers: dict[type[Any], Handler] = {}
        self._pending: dict[int, trio.MemorySendChannel[object]] = {}

    @property
    def rank(self) -> int | None:
        return self.wire.rank

    def handle(self, kind: type[Any], handler: Handler) -> None:
        """Route ``kind`` to ``handler``, from peers and from this node itself."""
        self._handlers[kind] = handler
        self.wire.handle(kind, handler)

    async def request(
        self,
        peer: int,
        message: object,
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 (a per-request deadline, like Transport.request)
        expect: type[Any] | None = None,
        frames: Sequence[Any] = (),
    ) -> Incoming[Any]:
        """A request and its reply; to this node's own rank it runs the local handler.
        ``frames``: payload (bulk data travels there, never in the 64 KiB header)."""
        if peer != self.rank:
            if frames:
                return await self.wire.request(
                    peer, message, frames, trace=trace, timeout=timeout, expect=expect
                )
            return await self.wire.request(
                peer, message, trace=trace, timeout=timeout, expect=expect
            )
        handler = self._handlers.get(type(message))
        if handler is None:
            raise ProtocolError(f"no local handler for {type(message).__qualname__}")
        rid = -next(_LOCAL_IDS)  # negative: never a transport's request id
        send, receive = trio.open_memory_channel[object](1)
        self._pending[rid] = send
        incoming: Incoming[Any] = Incoming(
            body=message,
            kind=type(message).__qualname__,
            sender=self.rank,
            frames=_frames(frames),
            trace=dict(trace or {}),
            request_id=rid,
        )
        try:
            with trio.move_on_after(timeout) as scope:
                try:
                    out = await handler(incoming)
                except Exception as exc:
                    raise RemoteError(
                        type(message).__qualname__, f"{type(exc).__name__}: {exc}"
                    ) from None
                if out is DEFERRED:
                    out = await receive.receive()
            if scope.cancelled_caught:
                raise RequestTimeout(f"local request {type(message).__qualname__} timed out")
        finally:
            self._pending.pop(rid, None)
        body = out.body if isinstance(out, Reply) else out
        if expect is not None and not isinstance(body, expect):
            raise ProtocolError(f"reply is {type(body).__qualname__}, expected {expect.__name__}")
        return Incoming(
            body=body,
            kind=type(body).__qualname__,
            sender=self.rank,
            frames=_frames(out.frames) if isinstance(out, Reply) else (),
            trace={},
            request_id=rid,
        )

    async def reply(
        self, request: Incoming[Any], message: object, *, trace: Mapping[str, str] | None = None
    ) -> None:
        """Answer a request a handler deferred (a local one or a peer's); a `Reply` brings
        its payload frames along."""
        if request.request_id < 0:
            send = self._pending.get(request.request_id)
            if send is not None:
                send.send_nowait(message)
            return
        if isinstance(message, Reply):
            await self.wire.reply(request, message.body, message.frames, trace=trace)
            return
        await self.wire.reply(request, message, trace=trace)
