"""pyzmq on trio: typed messages, zero-copy payload frames, request/reply, optional CURVE.

Every agent binds one ROUTER socket (its endpoint from ``--nodes``) and talks to each peer
through one DEALER socket connected to the peer's ROUTER. Requests go out on the DEALER, the
peer's handler runs in the peer's ROUTER reader and the reply comes back on the same
connection. A CLI client is a transport with no rank and no bound endpoint.

Every socket has exactly one reader task; senders never wait on the FD concurrently with it
(see :mod:`supervise.cluster._zsock`). Malformed, truncated or oversized messages are dropped,
counted in :attr:`Transport.stats` and logged (throttled); they never raise into the loop.

Bulk payloads can skip a copy: a kind handled with ``into=`` (and a request submitted with
``into=``) names a destination for its first payload frame once the header is decoded, and
the reader receives that frame straight into it (``Incoming.placed``) instead of keeping
libzmq's buffer around for the handler to copy from.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar, cast

import attrs
import structlog
import trio
import zmq

from supervise._validation import number
from supervise.cluster import _wire
from supervise.cluster._zap import ZapHandler
from supervise.cluster._zsock import ZSocket
from supervise.cluster.errors import PeerUnknown, ProtocolError, RemoteError, RequestTimeout
from supervise.cluster.keys import CurveKeys, node_key_name
from supervise.cluster.messages import KindRegistry, frozen_map, kind_of
from supervise.cluster.stats import TransportStats

T = TypeVar("T")
R = TypeVar("R")

log = structlog.get_logger("supervise.cluster.transport")

MiB = 1 << 20


@attrs.frozen(slots=True)
class TransportLimits:
    """Hard limits on what a transport accepts: anything larger is dropped, never buffered."""

    max_frame_size: int = attrs.field(default=64 * MiB, validator=number(ge=1024, integer=True))
    max_frames: int = attrs.field(default=64, validator=number(ge=1, integer=True))
    max_header_size: int = attrs.field(default=64 * 1024, validator=number(ge=256, integer=True))
    hwm: int = attrs.field(default=1000, validator=number(ge=1, integer=True))
    reply_send_timeout: float = attrs.field(default=5.0, validator=number(gt=0))


@attrs.frozen(slots=True)
class Incoming(Generic[T]):
    """A received message: the typed body, its payload and trace context.

    The payload is ``placed`` (frames received straight into the destination the kind's
    ``into`` hook gave, as views of exactly the bytes received) followed by ``frames``
    (zero-copy zmq frames); most kinds have no hook, so everything is in ``frames``.
    """

    body: T
    kind: str
    sender: int | None
    frames: tuple[zmq.Frame, ...]
    trace: Mapping[str, str]
    request_id: int
    _route: bytes | None = attrs.field(default=None, repr=False, alias="route")
    placed: tuple[memoryview, ...] = ()

    @property
    def buffers(self) -> tuple[memoryview, ...]:
        """All payload parts as memoryviews, in order (zero-copy; each keeps its frame alive)."""
        return (*self.placed, *(f.buffer for f in self.frames))

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.placed) + sum(len(f) for f in self.frames)


@attrs.frozen(slots=True)
class Reply:
    """What a request handler returns: a body, optional payload frames and trace context."""

    body: object
    frames: Sequence[Any] = ()
    trace: Mapping[str, str] | None = None


class _Deferred:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED: Any = _Deferred()
"""Returned by a request handler that will answer later with :meth:`Transport.reply`."""

Handler = Callable[[Incoming[Any]], Awaitable[object]]
Placer = Callable[[Any, "int | None"], "memoryview | None"]
"""``into(body, sender)``: where the first payload frame of a message goes, or None (a frame)."""


class PendingReply:
    """A request in flight; :meth:`wait` returns its reply."""

    __slots__ = ("_transport", "event", "into", "kind", "peer", "result", "rid")

    def __init__(
        self, transport: Transport, peer: int, rid: int, kind: str, into: memoryview | None = None
    ) -> None:
        self._transport = transport
        self.peer = peer
        self.rid = rid
        self.kind = kind
        self.into = into  # where the reply's first payload frame goes (None: a zmq frame)
        self.event = trio.Event()
        self.result: Incoming[Any] | BaseException | None = None

    async def wait(
        self,
        timeout: float = 5.0,  # noqa: ASYNC109 (a per-request deadline)
        *,
        expect: type[Any] | None = None,
    ) -> Incoming[Any]:
        """The reply; raises RequestTimeout, RemoteError or ProtocolError (not ``expect``)."""
        if expect is not None:
            self._transport.kinds.register(expect)
        try:
            with trio.move_on_after(timeout):
                await self.event.wait()
        finally:
            self.cancel()
        result = self.result
        if result is None:
            raise RequestTimeout(
                f"no reply from rank {self.peer} to {self.kind} within {timeout:g}s"
            )
        if isinstance(result, BaseException):
            raise result
        if expect is not None and not isinstance(result.body, expect):
            raise ProtocolError(
                f"{self.kind}: rank {self.peer} replied {result.kind}, expected {kind_of(expect)}"
            )
        return result

    def cancel(self) -> None:
        """Stop waiting; a reply that still comes is dropped."""
        self._transport._pending.pop(self.rid, None)


class _Throttle:
    """At most one log line per reason per second; counts what it suppressed."""

    __slots__ = ("_last", "_suppressed")

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def __call__(self, reason: str) -> int | None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) < 1.0:
            self._suppressed[reason] += 1
            return None
        self._last[reason] = now
        return self._suppressed.pop(reason, 0)


def _destination(buffer: Any) -> memoryview:
    """A buffer to receive a frame into, as writable contiguous bytes; TypeError otherwise."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(f"a {type(buffer).__name__} cannot receive a frame (no buffer)") from None
    if view.readonly or not view.c_contiguous:
        raise TypeError("a frame can only be received into a writable, contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


async def _send_within(sock: ZSocket, parts: list[Any], timeout: float) -> bool:  # noqa: ASYNC109
    """Send one message; False when the link did not take it within ``timeout`` seconds.
    When there is room on the link (the common case) no cancel scope is needed.
    """
    if sock.try_send_multipart(parts):
        await trio.lowlevel.cancel_shielded_checkpoint()
        return True
    with trio.move_on_after(timeout):
        await sock.send_multipart(parts)
        return True
    return False


def normalize_endpoint(endpoint: str) -> str:
    """``"host:port"`` -> ``"tcp://host:port"``; full zmq endpoints pass through."""
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError(f"endpoint {endpoint!r}: expected 'host:port' or a zmq endpoint")
    if "://" in endpoint:
        return endpoint
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not (port.isdigit() or port == "*"):
        raise ValueError(f"endpoint {endpoint!r}: expected 'host:port' or a zmq endpoint")
    if port == "0":
        port = "*"
    return f"tcp://{host}:{port}"


class Transport:
    """One agent's (or client's) messaging: a bound ROUTER plus one DEALER per peer."""

    def __init__(
        self,
        *,
        rank: int | None,
        endpoint: str | None = None,
        peers: Mapping[int, str] | None = None,
        limits: TransportLimits | None = None,
        curve: CurveKeys | None = None,
        kinds: Iterable[type[Any]] = (),
    ) -> None:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank = {rank!r}: must be an integer >= 0 or None (a client)")
        self.rank = rank
        self._bind = normalize_endpoint(endpoint) if endpoint is not None else None
        self._peers: dict[int, str] = {}
        self._dealers: dict[int, ZSocket] = {}
        self.limits = limits or TransportLimits()
        self.curve = curve
        self.kinds = KindRegistry(kinds)
        self.stats = TransportStats()
        self._handlers: dict[str, Handler] = {}
        self._placers: dict[str, Placer] = {}
        self._ctx: zmq.Context[Any] | None = None
        self._nursery: trio.Nursery | None = None
        self._router: ZSocket | None = None
        self._pending: dict[int, PendingReply] = {}
        self._ids = itertools.count(1)
        self._throttle = _Throttle()
        self._endpoint: str | None = None
        for r, ep in (peers or {}).items():
            self.set_peer(r, ep)

    # ---- configuration -------------------------------------------------------------------

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint, with a wildcard port resolved; None before serving / for clients."""
        return self._endpoint

    @property
    def peers(self) -> Mapping[int, str]:
        return dict(self._peers)

    @property
    def serving(self) -> bool:
        return self._nursery is not None

    def set_peer(self, rank: int, endpoint: str) -> None:
        """Add or move a peer; an open connection to its old endpoint is closed."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"peer rank {rank!r}: must be an integer >= 0")
        ep = normalize_endpoint(endpoint)
        if self._peers.get(rank) == ep:
            return
        self._peers[rank] = ep
        old = self._dealers.pop(rank, None)
        if old is not None:
            old.close()

    def handle(
        self,
        kind: type[T],
        handler: Callable[[Incoming[T]], Awaitable[object]],
        *,
        into: Callable[[T, int | None], memoryview | None] | None = None,
    ) -> None:
        """Route received messages of ``kind`` to ``handler`` (replacing any previous one).

        The handler runs in the socket's reader task, so messages of one connection are
        handled in order; it must not block for long (start a task and return
        :data:`DEFERRED` for slow requests). Its return value is the reply to a request: a
        :class:`Reply`, a message instance, or DEFERRED; an exception becomes an error reply.

        ``into(body, sender)``, called once the header is decoded and before the payload is
        taken off the socket, may return a writable, contiguous buffer (anything else, or an
        exception, is an error reply to a request): the first payload frame is then
        received straight into it and reaches the handler as ``Incoming.placed[0]`` (a view
        of the bytes received). A frame larger than the buffer drops the message (the buffer
        may hold a part of it by then; a request gets an error reply). Between
        ``into`` and the handler nothing else runs in this reader, so state ``into`` looked
        at is still as it was when the handler starts.
        """
        self.kinds.register(kind)
        name = kind_of(kind)
        self._handlers[name] = cast("Handler", handler)
        if into is None:
            self._placers.pop(name, None)
        else:
            self._placers[name] = cast("Placer", into)

    def unhandle(self, kind: type[Any], handler: Callable[..., Any] | None = None) -> None:
        """Stop routing ``kind``; with ``handler``, only if that handler is still the one
        installed (a restarted service may have installed its own meanwhile).
        """
        name = kind_of(kind)
        if handler is None or self._handlers.get(name) == handler:
            self._handlers.pop(name, None)
            self._placers.pop(name, None)

    # ---- lifecycle -----------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Transport] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open the sockets and run the readers until cancelled; then close everything.

        Can be run again after it returned (a supervised restart reopens the sockets).
        """
        if self._nursery is not None:
            raise RuntimeError("transport is already serving")
        ctx: zmq.Context[Any] = zmq.Context()
        self._ctx = ctx
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.curve is not None and self._bind is not None:
                    zap = ZapHandler(ctx, self.curve, self.stats)
                    await nursery.start(zap.run)
                if self._bind is not None:
                    self._router = self._open_router(ctx, self._bind)
                    nursery.start_soon(self._read_router, self._router)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._shutdown(ctx)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Transport]:
        """``async with transport.running():`` serve in the background for the block."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serve)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    def spawn(
        self, fn: Callable[..., Awaitable[object]], *args: Any, name: str | None = None
    ) -> trio.CancelScope:
        """Run ``fn(*args)`` in the background while the transport serves (for services
        built on it, such as replication); cancel the returned scope to stop it. An exception
        in it is logged and ends only that task, never the transport.
        """
        if self._nursery is None:
            raise trio.ClosedResourceError("transport is not serving")
        scope = trio.CancelScope()

        async def guarded() -> None:
            with scope:
                try:
                    await fn(*args)
                except Exception:
                    log.exception("background task failed", task=name or repr(fn))

        self._nursery.start_soon(guarded, name=name)
        return scope

    def _shutdown(self, ctx: zmq.Context[Any]) -> None:
        for pending in self._pending.values():
            if pending.result is None:
                pending.result = trio.ClosedResourceError("transport stopped")
            pending.event.set()
        self._pending.clear()
        for d in self._dealers.values():
            d.close()
        self._dealers.clear()
        if self._router is not None:
            self._router.close()
            self._router = None
        self._endpoint = None
        self._ctx = None
        ctx.destroy(linger=0)

    def _set_common(self, sock: zmq.Socket[Any]) -> None:
        lim = self.limits
        sock.linger = 0
        sock.sndhwm = lim.hwm
        sock.rcvhwm = lim.hwm
        sock.setsockopt(zmq.MAXMSGSIZE, max(lim.max_frame_size, lim.max_header_size))

    def _open_router(self, ctx: zmq.Context[Any], endpoint: str) -> ZSocket:
        sock = ctx.socket(zmq.ROUTER)
        self._set_common(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self.curve is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.curve.secret
            sock.curve_publickey = self.curve.public
            sock.zap_domain = b"supervise"
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(exc.errno, f"cannot bind {endpoint}: {exc.strerror}") from None
        self._endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return ZSocket(sock)

    def _dealer(self, peer: int) -> ZSocket:
        sock = self._dealers.get(peer)
        if sock is not None:
            return sock
        if self._ctx is None or self._nursery is None:
            raise trio.ClosedResourceError("transport is not serving")
        endpoint = self._peers.get(peer)
        if endpoint is None:
            raise PeerUnknown(f"no endpoint for rank {peer}")
        raw = self._ctx.socket(zmq.DEALER)
        self._set_common(raw)
        raw.setsockopt(zmq.IMMEDIATE, 1)
        raw.setsockopt(zmq.RECONNECT_IVL, 100)
        raw.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self.curve is not None:
            raw.curve_secretkey = self.curve.secret
            raw.curve_publickey = self.curve.public
            raw.curve_serverkey = self.curve.server_key(peer)
        raw.connect(endpoint)
        sock = ZSocket(raw)
        self._dealers[peer] = sock
        self._nursery.start_soon(self._read_dealer, peer, sock)
        return sock

    # ---- sending -------------------------------------------------------------------------

    def _check_frames(self, frames: Sequence[Any]) -> None:
        lim = self.limits
        if len(frames) > lim.max_frames:
            raise ValueError(f"{len(frames)} payload frames, at most {lim.max_frames} allowed")
        for i, f in enumerate(frames):
            n = f.nbytes if hasattr(f, "nbytes") else len(f)
            if n > lim.max_frame_size:
                raise ValueError(
                    f"payload frame {i} is {n} bytes, max_frame_size is {lim.max_frame_size}"
                )

    def _pack(
        self,
        message: object,
        request_id: int,
        flag: int,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
    ) -> list[Any]:
        name, body = self.kinds.encode(message)
        return self._pack_raw(name, body, request_id, flag, frames, trace)

    def _pack_raw(  # noqa: PLR0917
        self,
        name: str,
        body: Mapping[str, Any],
        request_id: int,
        flag: int,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
    ) -> list[Any]:
        self._check_frames(frames)
        header = _wire.encode_header(name, self.rank, request_id, flag, body, len(frames), trace)
        if len(header) > self.limits.max_header_size:
            raise ValueError(
                f"{name}: header is {len(header)} bytes, max_header_size is "
                f"{self.limits.max_header_size} (send bulk data as payload frames)"
            )
        return [header, *frames]

    def try_send(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
    ) -> bool:
        """Send a one-way message now if the link can take it; False if not connected or full.

        For best-effort traffic (heartbeats) that must never queue behind a dead peer.
        """
        parts = self._pack(message, 0, _wire.MESSAGE, frames, trace)
        ok = self._dealer(peer).try_send_multipart(parts)
        if ok:
            self.stats.sent += 1
        return ok

    async def send(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 (a per-message deadline, like ServerRef.call)
    ) -> None:
        """Send a one-way message, waiting up to ``timeout`` for the link to take it."""
        parts = self._pack(message, 0, _wire.MESSAGE, frames, trace)
        if not await _send_within(self._dealer(peer), parts, timeout):
            raise RequestTimeout(
                f"rank {peer} took no {kind_of(type(message))} within {timeout:g}s"
            )
        self.stats.sent += 1

    async def submit(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 (bounds the wait for room on the link)
        into: memoryview | None = None,
    ) -> PendingReply:
        """Send a request and return at once; ``await pending.wait()`` gets the reply.

        For pipelining (several requests in flight on one link, replies taken in order).
        With ``into``, the reply's first payload frame is received straight into that
        buffer (``Incoming.placed``); a larger frame fails the request with ProtocolError.
        The buffer is written only while the request is pending.
        """
        if into is not None:
            into = _destination(into)
        rid = next(self._ids)
        parts = self._pack(message, rid, _wire.MESSAGE, frames, trace)
        sock = self._dealer(peer)
        pending = PendingReply(self, peer, rid, kind_of(type(message)), into)
        self._pending[rid] = pending
        try:
            if await _send_within(sock, parts, timeout):
                self.stats.sent += 1
                return pending
        except BaseException:
            pending.cancel()
            raise
        pending.cancel()
        raise RequestTimeout(
            f"no reply from rank {peer} to {pending.kind} within {timeout:g}s "
            "(the link never took the request: peer down, unreachable or refusing us)"
        )

    async def request(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 (a per-request deadline, like ServerRef.call)
        expect: type[R] | None = None,
        into: memoryview | None = None,
    ) -> Incoming[Any]:
        """Send a request and wait for its reply (within ``timeout`` seconds, send included).

        Raises RequestTimeout, RemoteError (the peer's handler failed) or ProtocolError (the
        reply is not of kind ``expect``). ``into``: as for :meth:`submit`.
        """
        if expect is not None:
            self.kinds.register(expect)
        deadline = trio.current_time() + timeout
        pending = await self.submit(peer, message, frames, trace=trace, timeout=timeout, into=into)
        return await pending.wait(max(0.0, deadline - trio.current_time()), expect=expect)

    async def reply(
        self,
        request: Incoming[Any],
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """Answer a request (for handlers that returned DEFERRED)."""
        if request.request_id == 0 or request._route is None:
            raise ValueError(f"{request.kind} was not a request: nothing to reply to")
        parts = self._pack(message, request.request_id, _wire.REPLY, frames, trace)
        await self._send_routed(request._route, request.kind, parts)

    async def _send_routed(self, route: bytes, kind: str, parts: list[Any]) -> None:
        router = self._router
        if router is None or router.closed:
            return
        parts = [route, *parts]
        try:
            sent = await _send_within(router, parts, self.limits.reply_send_timeout)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the requester is gone
            self._drop("reply_unroutable", f"reply to {kind}: {exc.strerror}")
            return
        if sent:
            self.stats.sent += 1
        else:
            self._drop("reply_timeout", f"reply to {kind} not taken by the requester")

    # ---- receiving -----------------------------------------------------------------------

    def _drop(self, reason: str, detail: str) -> None:
        self.stats.dropped[reason] += 1
        suppressed = self._throttle(reason)
        if suppressed is not None:
            log.warning(
                "message dropped",
                reason=reason,
                detail=detail,
                rank=self.rank,
                suppressed=suppressed,
            )

    def _header(self, frame: zmq.Frame) -> _wire.Header:
        """Decode a header frame and check the sender against its CURVE key."""
        header = _wire.decode_header(frame.buffer, self.limits.max_header_size)
        user_id = self._user_id(frame)
        if user_id is not None:
            claimed = node_key_name(header.sender) if header.sender is not None else None
            if claimed != (user_id if user_id.startswith("node-") else None):
                raise ProtocolError(
                    f"{header.kind}: sender claims rank {header.sender} but its key is {user_id!r}"
                )
        return header

    def _user_id(self, frame: zmq.Frame) -> str | None:
        if self.curve is None:
            return None
        try:
            uid = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return uid if isinstance(uid, str) and uid else None

    def _payload(
        self, sock: ZSocket, header: _wire.Header, more: bool, dest: memoryview | None
    ) -> tuple[tuple[memoryview, ...], tuple[zmq.Frame, ...]]:
        """Take the message's payload parts off the socket (all of them, also when they are
        malformed): the first into ``dest`` when given, the others as zero-copy frames.
        """
        lim = self.limits
        placed: tuple[memoryview, ...] = ()
        frames: list[zmq.Frame] = []
        count = 0
        if more and dest is not None:
            n, more = sock.recv_part_into(dest)
            count = 1
            if n > len(dest):
                count += sock.skip_rest(more)
                raise ProtocolError(
                    f"{header.kind}: payload frame 0 is {n} bytes, its destination holds "
                    f"{len(dest)}"
                )
            placed = (dest[:n],)
        while more:
            if count >= lim.max_frames:
                count += sock.skip_rest(more)
                raise ProtocolError(f"{header.kind}: {count} payload frames, too many")
            frame = sock.recv_part()
            more = frame.more
            if len(frame) > lim.max_frame_size:
                count += 1 + sock.skip_rest(more)
                raise ProtocolError(
                    f"{header.kind}: payload frame {count - 1} is {len(frame)} bytes, too big"
                )
            frames.append(frame)
            count += 1
        if count != header.nframes:
            raise ProtocolError(
                f"{header.kind}: header announces {header.nframes} payload frames, "
                f"{count} arrived (truncated?)"
            )
        return placed, tuple(frames)

    async def _read_router(self, sock: ZSocket) -> None:
        while True:
            try:
                first = await sock.recv_first()
            except trio.ClosedResourceError:
                return
            self.stats.received += 1
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
        if not first.more:
            self._drop("malformed", "router message without a header frame")
            return None
        route = first.bytes
        head = sock.recv_part()
        try:
            header = self._header(head)
        except ProtocolError as exc:
            sock.skip_rest(head.more)
            self._drop("malformed", str(exc))
            return None
        if header.flag != _wire.MESSAGE:
            sock.skip_rest(head.more)
            self._drop("unexpected_reply", f"{header.kind}: reply sent to a server socket")
            return None
        handler = self._handlers.get(header.kind)
        try:
            if handler is None:
                raise ProtocolError(f"no handler for message kind {header.kind!r}")
            body = self.kinds.decode(header.kind, header.body)
        except ProtocolError as exc:
            sock.skip_rest(head.more)
            self._drop("unhandled" if handler is None else "malformed", str(exc))
            return header, None, None, route, str(exc)
        dest = None
        placer = self._placers.get(header.kind)
        if placer is not None and head.more:
            try:
                found = placer(body, header.sender)
                dest = None if found is None else _destination(found)
            except Exception as exc:
                sock.skip_rest(head.more)
                self.stats.handler_errors += 1
                log.exception("placement hook failed", kind=header.kind, rank=self.rank)
                return header, None, None, route, f"{type(exc).__name__}: {exc}"
        try:
            placed, payload = self._payload(sock, header, head.more, dest)
        except ProtocolError as exc:  # a request learns at once (its header is sound)
            self._drop("malformed", str(exc))
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
        except Exception as exc:
            self.stats.handler_errors += 1
            log.exception("message handler failed", kind=header.kind, rank=self.rank)
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
            parts = self._pack(
                reply.body, header.request_id, _wire.REPLY, reply.frames, reply.trace
            )
        except (TypeError, ValueError) as exc:
            self.stats.handler_errors += 1
            log.error("bad reply from handler", kind=header.kind, error=str(exc))
            await self._error_reply(header, route, f"bad reply: {exc}")
            return
        await self._send_routed(route, header.kind, parts)

    async def _error_reply(self, header: _wire.Header, route: bytes, reason: str) -> None:
        body = {"reason": reason[:1000]}
        parts = self._pack_raw(header.kind, body, header.request_id, _wire.ERROR, (), None)
        await self._send_routed(route, header.kind, parts)

    async def _read_dealer(self, peer: int, sock: ZSocket) -> None:
        while True:
            try:
                first = await sock.recv_first()
            except trio.ClosedResourceError:
                return
            self.stats.received += 1
            try:
                self._take_reply(peer, sock, first)
            finally:
                sock.received()
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _take_reply(self, peer: int, sock: ZSocket, head: zmq.Frame) -> None:
        """Receive the rest of one reply and hand it to its pending request (never awaits)."""
        try:
            header = self._header(head)
        except ProtocolError as exc:
            sock.skip_rest(head.more)
            self._drop("malformed", f"from rank {peer}: {exc}")
            return
        if header.flag == _wire.MESSAGE:
            sock.skip_rest(head.more)
            self._drop("unexpected_message", f"{header.kind}: unsolicited on a client link")
            return
        pending = self._pending.get(header.request_id)
        if pending is None or pending.event.is_set():
            sock.skip_rest(head.more)
            self._drop("late_reply", f"{header.kind}: reply to an expired request")
            return
        dest = pending.into if header.flag == _wire.REPLY else None
        try:
            placed, payload = self._payload(sock, header, head.more, dest)
        except ProtocolError as exc:
            self._drop("malformed", f"from rank {peer}: {exc}")
            if dest is not None:  # its destination may hold a part of it: fail the request
                pending.result = exc
                pending.event.set()
            return
        if header.flag == _wire.ERROR:
            reason = header.body.get("reason") if isinstance(header.body, dict) else None
            pending.result = RemoteError(header.kind, str(reason))
        else:
            try:
                body = self.kinds.decode(header.kind, header.body)
            except ProtocolError as exc:
                self._drop("malformed", f"reply from rank {peer}: {exc}")
                pending.result = exc
                pending.event.set()
                return
            pending.result = Incoming(
                body=body,
                kind=header.kind,
                sender=header.sender,
                frames=payload,
                trace=frozen_map(header.trace),
                request_id=header.request_id,
                placed=placed,
            )
        pending.event.set()
