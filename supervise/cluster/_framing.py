"""What a transport's router and dealer halves share: limits, the message types, framing.

:class:`Framing` turns a message into frames and frames back into a checked header and
payload, and counts and logs (throttled) what it drops; both halves of one transport share one.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import attrs
import structlog
import trio
import zmq

from supervise._validation import number
from supervise.cluster import _wire
from supervise.cluster._zsock import ZSocket
from supervise.cluster.errors import ProtocolError
from supervise.cluster.keys import CurveKeys, node_key_name
from supervise.cluster.messages import KindRegistry
from supervise.cluster.stats import TransportStats
from supervise.telemetry import Attr, get_telemetry

T = TypeVar("T")

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
    #: seconds a rank's connection must stay silent before another connection may speak for
    #: that rank (sooner when libzmq reports it closed): a restarted peer's new connection
    rebind_after: float = attrs.field(default=10.0, validator=number(gt=0))


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

MAX_PORT = 65535
"""The highest TCP port (zmq takes a larger one modulo 65536 without a word)."""

Handler = Callable[[Incoming[Any]], Awaitable[object]]
Placer = Callable[[Any, "int | None"], "memoryview | None"]
"""``into(body, sender)``: where the first payload frame of a message goes, or None (a frame)."""
#: The refusal counters' label for a message kind this transport does not know.
UNKNOWN_KIND = "unknown"
Allow = Callable[[Any, "int | None"], "str | None"]
"""``allow(body, sender)``: None when the sender may send this message, else why not."""


def normalize_endpoint(endpoint: str) -> str:
    """``"host:port"`` -> ``"tcp://host:port"``; full zmq endpoints pass through."""
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError(f"endpoint {endpoint!r}: expected 'host:port' or a zmq endpoint")
    if "://" in endpoint:
        return endpoint
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not (port.isdigit() or port == "*"):
        raise ValueError(f"endpoint {endpoint!r}: expected 'host:port' or a zmq endpoint")
    if port.isdigit() and int(port) > MAX_PORT:  # zmq would silently take it modulo 65536
        raise ValueError(f"endpoint {endpoint!r}: port {port} is out of range 0..{MAX_PORT}")
    if port == "0":
        port = "*"
    return f"tcp://{host}:{port}"


def destination(buffer: Any) -> memoryview:
    """A buffer to receive a frame into, as writable contiguous bytes; TypeError otherwise."""
    try:
        view = memoryview(buffer)
    except TypeError:
        raise TypeError(f"a {type(buffer).__name__} cannot receive a frame (no buffer)") from None
    if view.readonly or not view.c_contiguous:
        raise TypeError("a frame can only be received into a writable, contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


async def send_within(sock: ZSocket, parts: list[Any], timeout: float) -> bool:  # noqa: ASYNC109
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


class GaveUp(enum.StrEnum):
    """Why a request stopped waiting for its reply: a late reply's reason."""

    CANCELLED = "cancelled"  # its waiter went away on purpose (e.g. a push to a lost peer)
    TIMED_OUT = "timed_out"  # its deadline passed (a sign of a timeout too short for the load)
    UNKNOWN = "unknown"  # not remembered: given up long ago, or never asked


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


class Framing:
    """One transport's identity, limits, keys, kinds and stats, and the framing both of its
    halves use: packing messages, checking received headers and payloads, counting drops."""

    def __init__(
        self,
        rank: int | None,
        limits: TransportLimits,
        curve: CurveKeys | None,
        kinds: KindRegistry,
        nodes: int | None = None,
    ) -> None:
        self.rank = rank
        self.nodes = nodes  # the cluster's size: senders must be ranks below it (None: any)
        self.limits = limits
        self.curve = curve
        self.kinds = kinds
        self.stats = TransportStats()
        self._throttle = _Throttle()

    def configure(self, sock: zmq.Socket[Any]) -> None:
        """The options every socket of this transport has (no linger, limits, HWM)."""
        lim = self.limits
        sock.linger = 0
        sock.sndhwm = lim.hwm
        sock.rcvhwm = lim.hwm
        sock.setsockopt(zmq.MAXMSGSIZE, max(lim.max_frame_size, lim.max_header_size))

    def drop(self, reason: str, detail: str) -> None:
        """Count a dropped message and log it (at most once a second per reason)."""
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

    def refuse(self, kind: str, sender: int | None, reason: str) -> None:
        """Count a message (or, kind ``handshake``, a connection) refused for who sent it, in
        the stats and the metric, and log it (at most once a second per kind). A kind this
        transport does not know counts as ``unknown``: the name is the sender's choice, and
        each new one would grow the counters and open a log line of its own."""
        label = kind if kind == "handshake" or kind in self.kinds else UNKNOWN_KIND
        self.stats.refused[label] += 1
        get_telemetry().metrics.refused.add(1, {Attr.MESSAGE_KIND: label})
        suppressed = self._throttle(f"refused {label}")
        if suppressed is not None:
            log.warning(
                "message refused",
                kind=kind[:200],
                sender=sender,
                reason=reason,
                rank=self.rank,
                suppressed=suppressed,
            )

    def note_closed(self, peer: str) -> None:
        """A connection to this socket closed (at most one info line a second)."""
        suppressed = self._throttle("link closed")
        if suppressed is not None:
            log.info(
                "link closed (the peer left, or sent a message over max_frame_size)",
                peer=peer,
                rank=self.rank,
                suppressed=suppressed,
            )

    def late_reply(self, kind: str, why: GaveUp, peer: int) -> None:
        """Count a reply that came after its request was given up, and drop it. Nothing is
        lost (the requester went on without it, and said so if that mattered): a metric and a
        debug line; a reply to a timed-out or unknown request also an info line (throttled)."""
        self.stats.dropped["late_reply"] += 1
        get_telemetry().metrics.late_replies.add(1, {Attr.MESSAGE_KIND: kind, Attr.REASON: why})
        if why is GaveUp.CANCELLED:
            log.debug("late reply dropped", kind=kind, peer=peer, reason=why.value)
            return
        suppressed = self._throttle("late_reply")
        if suppressed is not None:
            log.info(
                "late reply dropped",
                kind=kind,
                peer=peer,
                reason=why.value,
                rank=self.rank,
                suppressed=suppressed,
            )

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

    def pack(
        self,
        message: object,
        request_id: int,
        flag: int,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
    ) -> list[Any]:
        """A message's frames: its header (kind, body, sender, request id, flag) and payload."""
        name, body = self.kinds.encode(message)
        return self.pack_raw(name, body, request_id, flag, frames, trace)

    def pack_raw(  # noqa: PLR0917
        self,
        name: str,
        body: Mapping[str, Any],
        request_id: int,
        flag: int,
        frames: Sequence[Any],
        trace: Mapping[str, str] | None,
    ) -> list[Any]:
        """As :meth:`pack`, for a body already encoded (error replies)."""
        self._check_frames(frames)
        header = _wire.encode_header(name, self.rank, request_id, flag, body, len(frames), trace)
        if len(header) > self.limits.max_header_size:
            raise ValueError(
                f"{name}: header is {len(header)} bytes, max_header_size is "
                f"{self.limits.max_header_size} (send bulk data as payload frames)"
            )
        return [header, *frames]

    # ---- receiving -----------------------------------------------------------------------

    def header(self, frame: zmq.Frame) -> _wire.Header:
        """Decode a header frame and check the sender against its CURVE key."""
        header = _wire.decode_header(frame.buffer, self.limits.max_header_size)
        if header.sender is not None and self.nodes is not None and header.sender >= self.nodes:
            raise ProtocolError(
                f"{header.kind}: sender rank {header.sender} is not in this cluster of "
                f"{self.nodes} nodes"
            )
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

    def payload(
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
