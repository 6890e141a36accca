"""A transport's dealer half: one DEALER socket per peer for outgoing messages and requests.

Each socket is opened on first use and has one reader, which hands every reply to the request
waiting for it (:class:`PendingReply`); replies to requests no longer waited for are dropped,
and counted as late by why their request was given up (cancelled, timed out).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import trio
import zmq

from supervise.cluster import _wire
from supervise.cluster._framing import (
    Framing,
    GaveUp,
    Incoming,
    destination,
    normalize_endpoint,
    send_within,
)
from supervise.cluster._zsock import ZSocket
from supervise.cluster.errors import PeerUnknown, ProtocolError, RemoteError, RequestTimeout
from supervise.cluster.messages import frozen_map, kind_of

R = TypeVar("R")

#: How many given-up requests a transport remembers, to say why a late reply is late.
GIVEN_UP_MEMORY = 4096


class PendingReply:
    """A request in flight; :meth:`wait` returns its reply."""

    __slots__ = ("_dealers", "event", "into", "kind", "peer", "result", "rid")

    def __init__(
        self, dealers: Dealers, peer: int, rid: int, kind: str, into: memoryview | None = None
    ) -> None:
        self._dealers = dealers
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
            self._dealers.kinds.register(expect)
        why = GaveUp.CANCELLED
        try:
            with trio.move_on_after(timeout) as deadline:
                await self.event.wait()
            if deadline.cancelled_caught:
                why = GaveUp.TIMED_OUT
        finally:
            self.cancel(why)
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

    def cancel(self, why: GaveUp = GaveUp.CANCELLED) -> None:
        """Stop waiting; a reply that still comes is dropped (counted late, for ``why``)."""
        self._dealers.forget(self.rid, why)


class Dealers:
    """The peers' endpoints, a DEALER socket per peer (while serving) and the requests in
    flight on them."""

    def __init__(self, framing: Framing) -> None:
        self._f = framing
        self.kinds = framing.kinds
        self.peers: dict[int, str] = {}
        self._socks: dict[int, ZSocket] = {}
        self._pending: dict[int, PendingReply] = {}
        self._given_up: dict[int, GaveUp] = {}  # request id -> why (the newest ones)
        self._ids = itertools.count(1)
        self._ctx: zmq.Context[Any] | None = None
        self._nursery: trio.Nursery | None = None

    def set_peer(self, rank: int, endpoint: str) -> None:
        """Add or move a peer; an open connection to its old endpoint is closed."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"peer rank {rank!r}: must be an integer >= 0")
        ep = normalize_endpoint(endpoint)
        if self.peers.get(rank) == ep:
            return
        self.peers[rank] = ep
        old = self._socks.pop(rank, None)
        if old is not None:
            old.close()

    def start(self, ctx: zmq.Context[Any], nursery: trio.Nursery) -> None:
        """Open sockets in ``ctx`` from now on, their readers in ``nursery``."""
        self._ctx = ctx
        self._nursery = nursery

    def stop(self) -> None:
        """Fail every request in flight and close every socket."""
        self._nursery = None
        for pending in self._pending.values():
            if pending.result is None:
                pending.result = trio.ClosedResourceError("transport stopped")
            pending.event.set()
        self._pending.clear()
        self._given_up.clear()
        for d in self._socks.values():
            d.close()
        self._socks.clear()
        self._ctx = None

    def forget(self, rid: int, why: GaveUp = GaveUp.CANCELLED) -> None:
        """No longer wait for the reply to request ``rid`` (given up for ``why``)."""
        pending = self._pending.pop(rid, None)
        if pending is not None and pending.result is None:
            self._given_up[rid] = why
            while len(self._given_up) > GIVEN_UP_MEMORY:
                del self._given_up[next(iter(self._given_up))]

    def _dealer(self, peer: int) -> ZSocket:
        sock = self._socks.get(peer)
        if sock is not None:
            return sock
        if self._ctx is None or self._nursery is None:
            raise trio.ClosedResourceError("transport is not serving")
        endpoint = self.peers.get(peer)
        if endpoint is None:
            raise PeerUnknown(f"no endpoint for rank {peer}")
        curve = self._f.curve
        raw = self._ctx.socket(zmq.DEALER)
        self._f.configure(raw)
        raw.setsockopt(zmq.IMMEDIATE, 1)
        raw.setsockopt(zmq.RECONNECT_IVL, 100)
        raw.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if curve is not None:
            raw.curve_secretkey = curve.secret
            raw.curve_publickey = curve.public
            raw.curve_serverkey = curve.server_key(peer)
        raw.connect(endpoint)
        sock = ZSocket(raw)
        self._socks[peer] = sock
        self._nursery.start_soon(self._read, peer, sock)
        return sock

    # ---- sending -------------------------------------------------------------------------

    def try_send(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
    ) -> bool:
        """See :meth:`Transport.try_send`."""
        parts = self._f.pack(message, 0, _wire.MESSAGE, frames, trace)
        ok = self._dealer(peer).try_send_multipart(parts)
        if ok:
            self._f.stats.sent += 1
        return ok

    async def send(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
        timeout: float,  # noqa: ASYNC109 (a per-message deadline)
    ) -> None:
        """See :meth:`Transport.send`."""
        parts = self._f.pack(message, 0, _wire.MESSAGE, frames, trace)
        if not await send_within(self._dealer(peer), parts, timeout):
            raise RequestTimeout(
                f"rank {peer} took no {kind_of(type(message))} within {timeout:g}s"
            )
        self._f.stats.sent += 1

    async def submit(  # noqa: PLR0917
        self,
        peer: int,
        message: object,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
        timeout: float,  # noqa: ASYNC109 (bounds the wait for room on the link)
        into: memoryview | None,
    ) -> PendingReply:
        """See :meth:`Transport.submit`."""
        if into is not None:
            into = destination(into)
        rid = next(self._ids)
        parts = self._f.pack(message, rid, _wire.MESSAGE, frames, trace)
        sock = self._dealer(peer)
        pending = PendingReply(self, peer, rid, kind_of(type(message)), into)
        self._pending[rid] = pending
        try:
            if await send_within(sock, parts, timeout):
                self._f.stats.sent += 1
                return pending
        except BaseException:
            pending.cancel()
            raise
        pending.cancel()
        raise RequestTimeout(
            f"no reply from rank {peer} to {pending.kind} within {timeout:g}s "
            "(the link never took the request: peer down, unreachable or refusing us)"
        )

    # ---- receiving -----------------------------------------------------------------------

    async def _read(self, peer: int, sock: ZSocket) -> None:
        while True:
            try:
                first = await sock.recv_first()
            except trio.ClosedResourceError:
                return
            self._f.stats.received += 1
            try:
                self._take_reply(peer, sock, first)
            finally:
                sock.received()
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _take_reply(self, peer: int, sock: ZSocket, head: zmq.Frame) -> None:
        """Receive the rest of one reply and hand it to its pending request (never awaits)."""
        f = self._f
        try:
            header = f.header(head)
        except ProtocolError as exc:
            sock.skip_rest(head.more)
            f.drop("malformed", f"from rank {peer}: {exc}")
            return
        if header.flag == _wire.MESSAGE:
            sock.skip_rest(head.more)
            f.drop("unexpected_message", f"{header.kind}: unsolicited on a client link")
            return
        pending = self._pending.get(header.request_id)
        if pending is None or pending.event.is_set():
            sock.skip_rest(head.more)
            why = self._given_up.pop(header.request_id, GaveUp.UNKNOWN)
            f.late_reply(header.kind, why, peer)
            return
        dest = pending.into if header.flag == _wire.REPLY else None
        try:
            placed, payload = f.payload(sock, header, head.more, dest)
        except ProtocolError as exc:
            f.drop("malformed", f"from rank {peer}: {exc}")
            if dest is not None:  # its destination may hold a part of it: fail the request
                pending.result = exc
                pending.event.set()
            return
        if header.flag == _wire.ERROR:
            reason = header.body.get("reason") if isinstance(header.body, dict) else None
            pending.result = RemoteError(header.kind, str(reason))
        else:
            try:
                body = f.kinds.decode(header.kind, header.body)
            except ProtocolError as exc:
                f.drop("malformed", f"reply from rank {peer}: {exc}")
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
