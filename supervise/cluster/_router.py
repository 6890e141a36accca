"""A transport's router half: the bound ROUTER socket that serves peers' requests.

Its one reader takes each message off the socket, routes it to the handler registered for its
kind, and sends the handler's answer (or an error reply) back on the same connection.

Who may say what: a rank speaks on one connection at a time (the first one that claimed it,
until libzmq reports it closed or it stays silent for ``rebind_after``), so a stranger's
connection cannot speak for a live peer; a kind's ``allow`` rule then says whether that sender
may send that message. Refusals are counted and logged (throttled); a request gets an error
reply naming why. A socket monitor counts refused handshakes and closed links (libzmq closes a
link that sends a message over ``max_frame_size`` without a word of its own).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import attrs
import structlog
import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from supervise.cluster import _wire
from supervise.cluster._framing import (
    DEFERRED,
    Allow,
    Framing,
    Handler,
    Incoming,
    Placer,
    Reply,
    destination,
    send_within,
)
from supervise.cluster._zsock import ZSocket
from supervise.cluster.errors import Declined, ProtocolError
from supervise.cluster.messages import frozen_map, kind_of

T = TypeVar("T")

log = structlog.get_logger("supervise.cluster.transport")

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)  # ZAP denials (HANDSHAKE_FAILED_AUTH) are counted by the ZAP handler itself
_WATCHED = _HANDSHAKE_FAILED | zmq.EVENT_DISCONNECTED


@attrs.define(slots=True)
class _Link:
    """The connection a rank speaks on: its routing id, socket fd and when it was last heard."""

    route: bytes
    fd: int
    last: float


def _fd_of(frame: zmq.Frame) -> int:
    try:
        return int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, TypeError, ValueError):
        return -1


class Router:
    """The handlers by kind and the bound ROUTER socket that runs them (while serving)."""

    def __init__(self, framing: Framing) -> None:
        self._f = framing
        self._handlers: dict[str, Handler] = {}
        self._placers: dict[str, Placer] = {}
        self._allow: dict[str, Allow] = {}
        self._links: dict[int, _Link] = {}  # rank -> the connection it speaks on
        self._sock: ZSocket | None = None
        self._monitor: ZSocket | None = None
        self.endpoint: str | None = None
        self.on_rank_closed: Callable[[int], None] | None = None  # a rank's connection closed

    # ---- handlers ------------------------------------------------------------------------

    def handle(
        self,
        kind: type[T],
        handler: Callable[[Incoming[T]], Awaitable[object]],
        into: Callable[[T, int | None], memoryview | None] | None,
        allow: Callable[[T, int | None], str | None] | None = None,
    ) -> None:
        """Route ``kind`` to ``handler`` (see :meth:`Transport.handle`)."""
        self._f.kinds.register(kind)
        name = kind_of(kind)
        self._handlers[name] = cast("Handler", handler)
        if into is None:
            self._placers.pop(name, None)
        else:
            self._placers[name] = cast("Placer", into)
        if allow is None:
            self._allow.pop(name, None)
        else:
            self._allow[name] = cast("Allow", allow)

    def unhandle(self, kind: type[Any], handler: Callable[..., Any] | None) -> None:
        """Stop routing ``kind`` (with ``handler``: only if it is still the one installed)."""
        name = kind_of(kind)
        if handler is None or self._handlers.get(name) == handler:
            self._handlers.pop(name, None)
            self._placers.pop(name, None)
            self._allow.pop(name, None)

    # ---- the socket ----------------------------------------------------------------------

    def open(self, ctx: zmq.Context[Any], endpoint: str) -> ZSocket:
        """Bind the ROUTER socket (a CURVE server when the transport has keys)."""
        curve = self._f.curve
        sock = ctx.socket(zmq.ROUTER)
        self._f.configure(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if curve is not None:
            sock.curve_server = True
            sock.curve_secretkey = curve.secret
            sock.curve_publickey = curve.public
            sock.zap_domain = b"supervise"
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(exc.errno, f"cannot bind {endpoint}: {exc.strerror}") from None
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._monitor = ZSocket(sock.get_monitor_socket(_WATCHED))
        self._monitor.raw.linger = 0
        self._sock = ZSocket(sock)
        self._links.clear()
        return self._sock

    def close(self) -> None:
        """Close the socket (if open); the reader then returns."""
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.endpoint = None

    async def watch(self) -> None:
        """Count what libzmq did to the socket's connections without a message: handshakes
        refused (a client without CURVE, a broken handshake) and links closed (the peer went,
        or it sent a message over ``max_frame_size``: libzmq cuts such a link at once)."""
        mon = self._monitor
        if mon is None:
            return
        while True:
            try:
                parts = await mon.recv_multipart()
            except trio.ClosedResourceError:
                return
            self._on_event(parts)

    def _take_events(self) -> None:
        """Handle the monitor's events already queued, without waiting: a link's close may
        still wait there when its peer's new connection speaks (trio runs ready tasks in any
        order), and must be known before that connection is judged."""
        mon = self._monitor
        while mon is not None:
            parts = mon.try_recv_multipart()
            if parts is None:
                return
            self._on_event(parts)

    def _on_event(self, parts: list[zmq.Frame]) -> None:
        f = self._f
        try:
            event = parse_monitor_message([p.bytes for p in parts])
        except Exception:  # not one of libzmq's events: nothing to count
            return
        peer = event["endpoint"].decode("utf-8", "replace")
        if event["event"] & _HANDSHAKE_FAILED:
            f.stats.auth_refused += 1
            f.refuse("handshake", None, f"handshake from {peer} failed (no or wrong CURVE)")
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            f.stats.links_closed += 1
            fd = event["value"]
            for rank, link in list(self._links.items()):
                if link.fd == fd:
                    del self._links[rank]
                    if self.on_rank_closed is not None:
                        self.on_rank_closed(rank)
            f.note_closed(peer)

    def _speaks_for(self, rank: int, route: bytes, fd: int) -> str | None:
        """None when the connection ``route`` may speak for ``rank`` (binding it), else why not."""
        now = trio.current_time()
        link = self._links.get(rank)
        if link is not None and link.route != route:
            self._take_events()  # the old link's close, if libzmq reported it already
            link = self._links.get(rank)
        if link is not None and link.route != route:
            if now - link.last < self._f.limits.rebind_after:
                return f"rank {rank} already speaks on another live connection"
            log.info("a rank's connection changed", rank=rank, silent=round(now - link.last, 1))
            link = None
        if link is None:
            self._links[rank] = _Link(route, fd, now)
        else:
            link.last = now
        return None

    async def reply(
        self,
        request: Incoming[Any],
        message: object,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
    ) -> None:
        """Answer a request later (see :meth:`Transport.reply`)."""
        if request.request_id == 0 or request._route is None:
            raise ValueError(f"{request.kind} was not a request: nothing to reply to")
        parts = self._f.pack(message, request.request_id, _wire.REPLY, frames, trace)
        await self._send_routed(request._route, request.kind, parts)

    async def _send_routed(self, route: bytes, kind: str, parts: list[Any]) -> None:
        router = self._sock
        if router is None or router.closed:
            return
        parts = [route, *parts]
        try:
            sent = await send_within(router, parts, self._f.limits.reply_send_timeout)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the requester is gone
            self._f.drop("reply_unroutable", f"reply to {kind}: {exc.strerror}")
            return
        if sent:
            self._f.stats.sent += 1
        else:
            self._f.drop("reply_timeout", f"reply to {kind} not taken by the requester")

    # ---- receiving -----------------------------------------------------------------------

    async def read(self, sock: ZSocket) -> None:
        """The socket's one reader: take, handle and answer messages until it is closed."""
        while True:
            try:
                first = await sock.recv_first()
            except trio.ClosedResourceError:
                return
            self._f.stats.received += 1
            try:
                handled = self._take_request(sock, first)
            finally:
                sock.received()
            if handled is not None:  # at once: nothing runs between placement and handler
                await self._dispatch(*handled)
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _take_request(
        self, sock: ZSocket, first: zmq.Frame
    ) -> tuple[_wire.Header, Any, Incoming[Any] | None, bytes, str | None] | None:
        """Receive the rest of one message from the router socket (never awaits, so nothing
        runs between a placement hook and the message's handler). Returns what to dispatch:
        (header, handler, message, route, None), or (header, None, None, route, why) for a
        message with a sound header that cannot be handled (a request gets an error reply),
        or None when the message was dropped.
        """
        f = self._f
        if not first.more:
            f.drop("malformed", "router message without a header frame")
            return None
        route = first.bytes
        head = sock.recv_part()
        try:
            header = f.header(head)
        except ProtocolError as exc:
            sock.skip_rest(head.more)
            f.drop("malformed", str(exc))
            return None
        if header.flag != _wire.MESSAGE:
            sock.skip_rest(head.more)
            f.drop("unexpected_reply", f"{header.kind}: reply sent to a server socket")
            return None
        if header.sender is not None:
            why = (
                f"a message claiming this node's own rank {f.rank}"
                if header.sender == f.rank
                else self._speaks_for(header.sender, route, _fd_of(head))
            )
            if why is not None:
                sock.skip_rest(head.more)
                f.refuse(header.kind, header.sender, why)
                return header, None, None, route, f"refused: {why}"
        handler = self._handlers.get(header.kind)
        try:
            if handler is None:
                raise ProtocolError(f"no handler for message kind {header.kind!r}")
            body = f.kinds.decode(header.kind, header.body)
        except ProtocolError as exc:
            sock.skip_rest(head.more)
            f.drop("unhandled" if handler is None else "malformed", str(exc))
            return header, None, None, route, str(exc)
        allow = self._allow.get(header.kind)
        why = None if allow is None else allow(body, header.sender)
        if why is not None:
            sock.skip_rest(head.more)
            f.refuse(header.kind, header.sender, why)
            return header, None, None, route, f"refused: {why}"
        dest = None
        placer = self._placers.get(header.kind)
        if placer is not None and head.more:
            try:
                found = placer(body, header.sender)
                dest = None if found is None else destination(found)
            except Exception as exc:
                sock.skip_rest(head.more)
                f.stats.handler_errors += 1
                log.exception("placement hook failed", kind=header.kind, rank=f.rank)
                return header, None, None, route, f"{type(exc).__name__}: {exc}"
        try:
            placed, payload = f.payload(sock, header, head.more, dest)
        except ProtocolError as exc:  # a request learns at once (its header is sound)
            f.drop("malformed", str(exc))
            return header, None, None, route, str(exc)
        msg: Incoming[Any] = Incoming(
            body=body,
            kind=header.kind,
            sender=header.sender,
            frames=payload,
            trace=frozen_map(header.trace),
            request_id=header.request_id,
            route=route if header.request_id != 0 else None,
            placed=placed,
        )
        return header, handler, msg, route, None

    async def _dispatch(
        self,
        header: _wire.Header,
        handler: Handler | None,
        msg: Incoming[Any] | None,
        route: bytes,
        refused: str | None,
    ) -> None:
        is_request = header.request_id != 0
        if handler is None or msg is None:
            if is_request:
                await self._error_reply(header, route, refused or "cannot be handled")
            return
        try:
            result = await handler(msg)
        except Declined as exc:  # an answer the handler chose: its caller decides what it means
            log.debug("request declined", kind=header.kind, rank=self._f.rank, reason=str(exc))
            if is_request:
                await self._error_reply(header, route, f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:
            self._f.stats.handler_errors += 1
            log.exception("message handler failed", kind=header.kind, rank=self._f.rank)
            if is_request:
                await self._error_reply(header, route, f"{type(exc).__name__}: {exc}")
            return
        if not is_request or result is DEFERRED:
            return
        if result is None:
            await self._error_reply(header, route, "handler gave no reply")
            return
        reply = result if isinstance(result, Reply) else Reply(result)
        try:
            parts = self._f.pack(
                reply.body, header.request_id, _wire.REPLY, reply.frames, reply.trace
            )
        except (TypeError, ValueError) as exc:
            self._f.stats.handler_errors += 1
            log.error("bad reply from handler", kind=header.kind, error=str(exc))
            await self._error_reply(header, route, f"bad reply: {exc}")
            return
        await self._send_routed(route, header.kind, parts)

    async def _error_reply(self, header: _wire.Header, route: bytes, reason: str) -> None:
        body = {"reason": reason[:1000]}
        parts = self._f.pack_raw(header.kind, body, header.request_id, _wire.ERROR, (), None)
        await self._send_routed(route, header.kind, parts)
