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

The halves: :mod:`._router` (the bound ROUTER serving peers' requests), :mod:`._dealer` (a
DEALER per peer for outgoing messages and requests and their replies), and what they share in
:mod:`._framing`; :class:`Transport` composes them and owns the sockets' lifetime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import structlog
import trio
import zmq

from supervise.cluster._dealer import Dealers, PendingReply
from supervise.cluster._framing import (
    DEFERRED,
    MAX_PORT,
    Framing,
    Handler,
    Incoming,
    Placer,
    Reply,
    TransportLimits,
    normalize_endpoint,
)
from supervise.cluster._router import Router
from supervise.cluster._zap import ZapHandler
from supervise.cluster.keys import CurveKeys
from supervise.cluster.messages import KindRegistry
from supervise.cluster.stats import TransportStats

__all__ = [
    "DEFERRED",
    "MAX_PORT",
    "Handler",
    "Incoming",
    "PendingReply",
    "Placer",
    "Reply",
    "Transport",
    "TransportLimits",
    "normalize_endpoint",
]

T = TypeVar("T")
R = TypeVar("R")

log = structlog.get_logger("supervise.cluster.transport")


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
        nodes: int | None = None,
    ) -> None:
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank = {rank!r}: must be an integer >= 0 or None (a client)")
        self._bind = normalize_endpoint(endpoint) if endpoint is not None else None
        if nodes is not None and (
            isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1
        ):
            raise ValueError(f"nodes = {nodes!r}: must be an integer >= 1 or None (any rank)")
        self._framing = Framing(
            rank, limits or TransportLimits(), curve, KindRegistry(kinds), nodes=nodes
        )
        self._router = Router(self._framing)
        self._dealers = Dealers(self._framing)
        self._nursery: trio.Nursery | None = None
        for r, ep in (peers or {}).items():
            self.set_peer(r, ep)

    # ---- configuration -------------------------------------------------------------------

    @property
    def rank(self) -> int | None:
        """This node's rank; None for a client."""
        return self._framing.rank

    @property
    def limits(self) -> TransportLimits:
        """What this transport accepts and how long a reply may wait for the link."""
        return self._framing.limits

    @property
    def nodes(self) -> int | None:
        """The cluster's size: a message from a higher sender rank is dropped (None: any)."""
        return self._framing.nodes

    @property
    def curve(self) -> CurveKeys | None:
        """The CURVE keys (None: plain TCP)."""
        return self._framing.curve

    @property
    def kinds(self) -> KindRegistry:
        """The message kinds this transport can decode."""
        return self._framing.kinds

    @property
    def stats(self) -> TransportStats:
        """Messages sent, received and dropped (by reason), handler errors."""
        return self._framing.stats

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint, with a wildcard port resolved; None before serving / for clients."""
        return self._router.endpoint

    @property
    def peers(self) -> Mapping[int, str]:
        """A copy of the peers' endpoints by rank."""
        return dict(self._dealers.peers)

    def on_rank_closed(self, callback: Callable[[int], None] | None) -> None:
        """Call ``callback(rank)`` when the connection a peer rank spoke on to this node
        closes (its process may be gone: `Membership` checks)."""
        self._router.on_rank_closed = callback

    def set_peer(self, rank: int, endpoint: str) -> None:
        """Add or move a peer; an open connection to its old endpoint is closed."""
        self._dealers.set_peer(rank, endpoint)

    def handle(
        self,
        kind: type[T],
        handler: Callable[[Incoming[T]], Awaitable[object]],
        *,
        into: Callable[[T, int | None], memoryview | None] | None = None,
        allow: Callable[[T, int | None], str | None] | None = None,
    ) -> None:
        """Route received messages of ``kind`` to ``handler`` (replacing any previous one).

        ``allow(body, sender)``, called once the body is decoded and before anything else,
        returns None when ``sender`` may send this message, else why not: the message is then
        refused (counted in ``stats.refused``, logged, a request gets an error reply) and its
        payload is never taken in.

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
        self._router.handle(kind, handler, into, allow)

    def unhandle(self, kind: type[Any], handler: Callable[..., Any] | None = None) -> None:
        """Stop routing ``kind``; with ``handler``, only if that handler is still the one
        installed (a restarted service may have installed its own meanwhile).
        """
        self._router.unhandle(kind, handler)

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
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._dealers.start(ctx, nursery)
                if self.curve is not None and self._bind is not None:
                    zap = ZapHandler(ctx, self.curve, self.stats, self._framing.refuse)
                    await nursery.start(zap.run)
                if self._bind is not None:
                    nursery.start_soon(self._router.read, self._router.open(ctx, self._bind))
                    nursery.start_soon(self._router.watch)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._dealers.stop()
            self._router.close()
            ctx.destroy(linger=0)

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

    # ---- sending -------------------------------------------------------------------------

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
        return self._dealers.try_send(peer, message, frames, trace)

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
        await self._dealers.send(peer, message, frames, trace, timeout)

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
        return await self._dealers.submit(peer, message, frames, trace, timeout, into)

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
        await self._router.reply(request, message, frames, trace)
