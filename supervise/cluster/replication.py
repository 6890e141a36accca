"""Replication over the transport: chunked pushes with acks and credits, ranged fetches.

Push (the owner of a shard -> a group peer)::

    PushBegin(meta) + [manifest]        -> PushReady(transfer, window)   | "held" | error
    PushChunk(transfer, offset) + [data] -> PushAck(transfer, received)   (window chunks in flight)
    PushEnd(transfer)                   -> PushDone                       (verified: servable)

The receiver grants ``window`` credits; each ack returns one, so a slow receiver slows the
sender down instead of buffering. Each chunk is hashed (XXH3-64 per tensor) in libzmq's
receive buffer and kept there: the replica is the list of buffers its chunks arrived in, with
no copy (`Held`). Only a complete, verified shard becomes servable.

Fetch (a replacement node <- a holder)::

    FetchOpen(rank, version)            -> FetchMeta(lease, meta) + [manifest]  (pins the replica)
    FetchRange(lease, offset, length)   -> FetchData(lease, offset) + [data...] (pipelined)
    FetchClose(lease)                   -> FetchClosed

The holder sends views of its replica's buffers (zero-copy: one frame per buffer a range
spans); ranges are hashed in the fetcher's receive buffers and copied into the destination
block by block, while each block is still in cache, in order, as they arrive.

Timeouts fit the transfer: a wait for bytes (an ack of the chunks sent since the last one, a
fetched range, room on the link for a chunk) gets the per-message ``timeout`` as a floor plus
those bytes at ``min_rate`` (`transfer_timeout`), so a large window on a busy link does not
time out where a small message would not.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import attrs
import structlog
import trio

from supervise.cluster._buffers import anonymous
from supervise.cluster._malloc import keep_receive_buffers
from supervise.cluster.access import ReplicaAccess
from supervise.cluster.errors import ChecksumMismatch, ProtocolError, TransferAborted
from supervise.cluster.messages import message_kind
from supervise.cluster.replica_store import Refused, Replica, ReplicaStore
from supervise.cluster.shard import Check, ShardMeta, StreamVerifier
from supervise.cluster.transport import Incoming, PendingReply, Reply, Transport
from supervise.snapshot.hashing import Checksum, checksum_kind

log = structlog.get_logger("supervise.cluster.replication")

MiB = 1 << 20
DEFAULT_CHUNK = 8 * MiB
DEFAULT_WINDOW = 8
MAX_WINDOW = 64
#: The slowest throughput (bytes/s) a transfer must keep up before a wait for its bytes times
#: out (on top of the per-message floor): a loaded 1 Gb/s link still moves ten times more.
DEFAULT_MIN_RATE = 8 * MiB


def transfer_timeout(nbytes: int, floor: float, min_rate: float) -> float:
    """How long to wait for ``nbytes`` to cross a link: ``floor`` seconds (latency, a busy
    peer) plus the bytes at ``min_rate`` bytes/s. ValueError naming a bad argument."""
    if nbytes < 0:
        raise ValueError(f"nbytes {nbytes!r}: must be >= 0")
    if not floor > 0:
        raise ValueError(f"floor {floor!r}: must be a positive number of seconds")
    if not min_rate > 0:
        raise ValueError(f"min_rate {min_rate!r}: must be a positive number of bytes/s")
    return floor + nbytes / min_rate


CheckTuple = tuple[str, int, int, int]


def _checks_out(meta: ShardMeta) -> list[CheckTuple]:
    return [(c.name, c.offset, c.nbytes, c.digest) for c in meta.checks]


#: The checks' algorithm when a message names none (a peer from before manifest format 2).
_LEGACY_CHECKSUM: Final = Checksum.XXH64.value


def _meta_in(body: PushBegin | FetchMeta, manifest: bytes) -> ShardMeta:
    try:
        checks = [Check(*c) for c in body.checks]
        return ShardMeta(
            body.rank,
            body.version,
            body.generation,
            body.nbytes,
            checks,
            manifest,
            checksum_kind(body.checksum),
        )
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"bad shard description: {exc}") from None


# ---- message kinds ---------------------------------------------------------------------


@message_kind("replica.push_begin")
@attrs.frozen(slots=True)
class PushBegin:
    rank: int
    version: int
    generation: int
    nbytes: int
    checks: list[CheckTuple]
    window: int = DEFAULT_WINDOW
    checksum: str = _LEGACY_CHECKSUM


@message_kind("replica.push_ready")
@attrs.frozen(slots=True)
class PushReady:
    transfer: int  # 0 when the receiver already holds this version
    window: int


@message_kind("replica.push_chunk")
@attrs.frozen(slots=True)
class PushChunk:
    transfer: int
    offset: int


@message_kind("replica.push_ack")
@attrs.frozen(slots=True)
class PushAck:
    transfer: int
    received: int


@message_kind("replica.push_end")
@attrs.frozen(slots=True)
class PushEnd:
    transfer: int


@message_kind("replica.push_done")
@attrs.frozen(slots=True)
class PushDone:
    rank: int
    version: int
    generation: int


@message_kind("replica.push_abort")
@attrs.frozen(slots=True)
class PushAbort:
    transfer: int


@message_kind("replica.fetch_open")
@attrs.frozen(slots=True)
class FetchOpen:
    rank: int
    version: int = -1  # -1: the newest held


@message_kind("replica.fetch_meta")
@attrs.frozen(slots=True)
class FetchMeta:
    lease: int
    rank: int
    version: int
    generation: int
    nbytes: int
    checks: list[CheckTuple]
    checksum: str = _LEGACY_CHECKSUM


@message_kind("replica.fetch_range")
@attrs.frozen(slots=True)
class FetchRange:
    lease: int
    offset: int
    length: int


@message_kind("replica.fetch_data")
@attrs.frozen(slots=True)
class FetchData:
    lease: int
    offset: int


@message_kind("replica.fetch_close")
@attrs.frozen(slots=True)
class FetchClose:
    lease: int
    corrupt: str = ""  # the fetcher found the bytes fail their checksums: why


@message_kind("replica.fetch_closed")
@attrs.frozen(slots=True)
class FetchClosed:
    lease: int


@message_kind("replica.inventory")
@attrs.frozen(slots=True)
class InventoryQuery:
    pass


@message_kind("replica.inventory_reply")
@attrs.frozen(slots=True)
class InventoryReply:
    held: list[tuple[int, int, int]]  # (rank, version, generation), newest first per rank
    held_bytes: int
    budget: int


KINDS = (
    PushBegin,
    PushReady,
    PushChunk,
    PushAck,
    PushEnd,
    PushDone,
    PushAbort,
    FetchOpen,
    FetchMeta,
    FetchRange,
    FetchData,
    FetchClose,
    FetchClosed,
    InventoryQuery,
    InventoryReply,
)


# ---- serving (the holder side) ---------------------------------------------------------


@attrs.define(slots=True, eq=False)
class _Lease:
    replica: Replica
    peer: int | None
    last_used: float


class ReplicaEndpoint:
    """Serves pushes into and fetches from a :class:`ReplicaStore` over a transport."""

    def __init__(
        self,
        transport: Transport,
        store: ReplicaStore,
        *,
        max_chunk: int | None = None,
        max_window: int = MAX_WINDOW,
        on_replica: Callable[[Replica], None] | None = None,
        access: ReplicaAccess | None = None,
    ) -> None:
        """``access``: who may push and fetch which rank (None: anyone, for tests and tools
        that serve a store by hand; a node agent always gives its placement's rules)."""
        self.transport = transport
        self.access = access
        self.store = store
        self.max_chunk = max_chunk or transport.limits.max_frame_size
        self.max_window = max_window
        self.on_replica = on_replica
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._sources: dict[int, int | None] = {}  # transfer -> node that pushes it
        self._failed: dict[int, tuple[int | None, str]] = {}  # transfer -> (sender, why)
        transport.kinds.register(*KINDS)

    def _routes(self) -> list[tuple[type[Any], Callable[[Incoming[Any]], Awaitable[object]]]]:
        return [
            (PushBegin, self._push_begin),
            (PushChunk, self._push_chunk),
            (PushEnd, self._push_end),
            (PushAbort, self._push_abort),
            (FetchOpen, self._fetch_open),
            (FetchRange, self._fetch_range),
            (FetchClose, self._fetch_close),
            (InventoryQuery, self._inventory),
        ]

    def _may_push(self, body: PushBegin, sender: int | None) -> str | None:
        return None if self.access is None else self.access.push(body.rank, sender)

    def _may_fetch(self, body: FetchOpen, sender: int | None) -> str | None:
        return None if self.access is None else self.access.fetch(body.rank, sender)

    def install(self) -> None:
        """Route the replication kinds to this endpoint (with ``access``'s rules: a push or
        fetch open by a sender the placement does not name is refused before any memory)."""
        keep_receive_buffers()
        rules: dict[type[Any], Callable[[Any, int | None], str | None]] = {
            PushBegin: self._may_push,
            FetchOpen: self._may_fetch,
        }
        for kind, handler in self._routes():
            self.transport.handle(kind, handler, allow=rules.get(kind))

    def uninstall(self) -> None:
        """Stop serving (leaves a newer endpoint's routes alone) and release the leases."""
        for kind, handler in self._routes():
            self.transport.unhandle(kind, handler)
        for lease in self._leases.values():
            self.store.unpin(lease.replica)
        self._leases.clear()

    # -- pushes ---------------------------------------------------------------------------

    async def _push_begin(self, msg: Incoming[PushBegin]) -> object:
        b = msg.body
        if len(msg.frames) != 1:
            raise ProtocolError("push_begin carries exactly one frame: the manifest")
        meta = _meta_in(b, msg.frames[0].bytes)
        try:
            rec = self.store.begin(meta, msg.sender, trio.current_time())
        except Refused as exc:
            log.info("push refused", shard=meta.label, source=msg.sender, reason=str(exc))
            raise
        if rec is None:
            return PushReady(transfer=0, window=0)
        self._sources[rec.id] = msg.sender
        return PushReady(transfer=rec.id, window=max(1, min(b.window, self.max_window)))

    def _own(self, transfer: int, sender: int | None) -> None:
        if transfer not in self._sources or self._sources[transfer] != sender:
            failed = self._failed.get(transfer)
            if failed is not None and failed[0] == sender:
                raise ProtocolError(f"transfer {transfer} failed: {failed[1]}")
            raise ProtocolError(f"transfer {transfer} is not in flight from this sender")

    def _fail(self, transfer: int, sender: int | None, reason: str) -> None:
        """Abort a transfer and remember why, for the sender's next request (chunks between
        acks are one-way messages: their errors have no reply of their own).
        """
        self._forget(transfer)
        self._failed[transfer] = (sender, reason)
        while len(self._failed) > 64:
            del self._failed[next(iter(self._failed))]

    async def _push_chunk(self, msg: Incoming[PushChunk]) -> object:
        b = msg.body
        self._own(b.transfer, msg.sender)
        if len(msg.frames) != 1:
            self._fail(b.transfer, msg.sender, "a push_chunk without exactly one data frame")
            raise ProtocolError("push_chunk carries exactly one data frame")
        data = msg.frames[0].buffer
        if len(data) > self.max_chunk:
            self._fail(b.transfer, msg.sender, f"chunk of {len(data)} bytes, too big")
            raise ProtocolError(f"chunk of {len(data)} bytes exceeds {self.max_chunk}")
        try:
            rec = self.store.chunk(b.transfer, b.offset, data, trio.current_time())
        except (ProtocolError, ChecksumMismatch) as exc:
            self._fail(b.transfer, msg.sender, f"{type(exc).__name__}: {exc}")
            log.warning("push rejected", transfer=b.transfer, source=msg.sender, error=str(exc))
            raise
        return PushAck(b.transfer, rec.received)

    async def _push_end(self, msg: Incoming[PushEnd]) -> object:
        self._own(msg.body.transfer, msg.sender)
        self._sources.pop(msg.body.transfer, None)
        rep = self.store.finish(msg.body.transfer, trio.current_time())
        log.info("replica stored", shard=rep.meta.label, source=msg.sender, nbytes=rep.meta.nbytes)
        if self.on_replica is not None:
            self.on_replica(rep)
        return PushDone(rep.meta.rank, rep.meta.version, rep.meta.generation)

    async def _push_abort(self, msg: Incoming[PushAbort]) -> None:
        if self._sources.get(msg.body.transfer, -1) == msg.sender:
            self._forget(msg.body.transfer)

    def _forget(self, transfer: int) -> None:
        self._sources.pop(transfer, None)
        self.store.abort(transfer)

    def drop_from(self, sender: int) -> None:
        """Abort the pushes ``sender`` has in flight (it was lost): their memory goes back to
        the system at once, not after the idle timeout."""
        for rec in self.store.receptions():
            if rec.source == sender:
                self._sources.pop(rec.id, None)
                self.store.release(rec.id)
                log.info("push dropped: its sender was lost", shard=rec.meta.label, peer=sender)

    def expire(self, idle: float) -> None:
        """Abort receptions and leases idle for ``idle`` seconds (their peer died)."""
        now = trio.current_time()
        for rec in self.store.expire(now, idle):
            self._sources.pop(rec.id, None)
            log.warning("push expired", shard=rec.meta.label, received=rec.received)
        for lid, lease in list(self._leases.items()):
            if now - lease.last_used >= idle:
                del self._leases[lid]
                self.store.unpin(lease.replica)

    # -- fetches --------------------------------------------------------------------------

    async def _fetch_open(self, msg: Incoming[FetchOpen]) -> object:
        b = msg.body
        rep = self.store.pin(b.rank, None if b.version < 0 else b.version)
        if rep is None:
            what = "any version" if b.version < 0 else f"version {b.version}"
            raise LookupError(f"no replica of rank {b.rank} at {what} here")
        lid = next(self._lease_ids)
        self._leases[lid] = _Lease(rep, msg.sender, trio.current_time())
        m = rep.meta
        body = FetchMeta(
            lid, m.rank, m.version, m.generation, m.nbytes, _checks_out(m), m.checksum.value
        )
        return Reply(body, frames=[m.manifest])

    async def _fetch_range(self, msg: Incoming[FetchRange]) -> object:
        b = msg.body
        lease = self._leases.get(b.lease)
        if lease is None or lease.peer != msg.sender:
            raise LookupError(f"fetch lease {b.lease} is unknown or expired")
        if b.length > self.max_chunk:
            raise ValueError(f"range of {b.length} bytes exceeds {self.max_chunk}")
        lease.last_used = trio.current_time()
        # one frame per received buffer the range spans (zero-copy)
        return Reply(FetchData(b.lease, b.offset), frames=lease.replica.view(b.offset, b.length))

    async def _fetch_close(self, msg: Incoming[FetchClose]) -> object:
        lease = self._leases.get(msg.body.lease)
        if lease is not None and lease.peer == msg.sender:
            del self._leases[msg.body.lease]
            try:
                if msg.body.corrupt:
                    await self._check_reported(lease.replica, msg.sender, msg.body.corrupt)
            finally:
                self.store.unpin(lease.replica)
        return FetchClosed(msg.body.lease)

    async def _check_reported(self, rep: Replica, sender: int | None, reason: str) -> None:
        """A fetcher found this replica's bytes corrupt: verify them here (off the event loop)
        and drop the replica if they fail, so it is never served or offered again."""
        meta = rep.meta

        def verify() -> str:
            try:
                verifier = StreamVerifier.for_shard(meta)
                for piece in rep.pieces():
                    verifier.feed(piece)
            except ChecksumMismatch as exc:
                return str(exc)
            return ""

        failed = await trio.to_thread.run_sync(verify)
        if failed:
            self.store.discard(rep)
            log.warning("replica corrupt: dropped", shard=meta.label, reporter=sender, error=failed)
        else:
            log.warning(
                "replica reported corrupt verifies here: kept",
                shard=meta.label,
                reporter=sender,
                reason=reason,
            )

    async def _inventory(self, msg: Incoming[InventoryQuery]) -> object:
        held = [
            (rank, v, g) for rank, versions in self.store.inventory().items() for v, g in versions
        ]
        return InventoryReply(held, self.store.held_bytes, self.store.budget)


# ---- clients ---------------------------------------------------------------------------


async def push_shard(
    transport: Transport,
    peer: int,
    meta: ShardMeta,
    data: memoryview,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    window: int = DEFAULT_WINDOW,
    timeout: float = 30.0,  # noqa: ASYNC109 (per message, not for the whole transfer)
    trace: Mapping[str, str] | None = None,
    min_rate: float = DEFAULT_MIN_RATE,
) -> bool:
    """Push one shard to ``peer``; True when sent, False when the peer already held it.

    Zero-copy: chunks are slices of ``data``, which must stay unchanged until this returns
    (a change is caught by the receiver's checksums). Cancelling aborts the transfer at the
    receiver (the replies still on their way are counted late, as cancelled). ``timeout``:
    the floor of every wait, plus the bytes waited for at ``min_rate`` (`transfer_timeout`).
    Raises RemoteError (refused: stale, budget; or a checksum mismatch), RequestTimeout.
    """
    transfer_timeout(0, timeout, min_rate)  # bad arguments fail before anything is sent
    if len(data) < meta.nbytes:
        raise ValueError(f"{meta.label}: {len(data)} bytes given, the manifest says {meta.nbytes}")
    transport.kinds.register(*KINDS)
    begin = PushBegin(
        meta.rank,
        meta.version,
        meta.generation,
        meta.nbytes,
        _checks_out(meta),
        window,
        meta.checksum.value,
    )
    ready = (
        await transport.request(
            peer, begin, [meta.manifest], timeout=timeout, expect=PushReady, trace=trace
        )
    ).body
    if ready.transfer == 0:
        return False
    tid = ready.transfer
    # Credits: at most `window` chunks unacknowledged. Only every `every`-th chunk (and the
    # last) is a request; an ack covers every chunk before it (one link, handled in order).
    window = ready.window
    every = max(1, window // 2)
    # (chunks sent incl. this one, bytes sent incl. this one, its ack)
    inflight: deque[tuple[int, int, PendingReply]] = deque()
    acked_bytes = 0

    async def take_ack() -> int:
        nonlocal acked_bytes
        acked, upto, pending = inflight.popleft()
        await pending.wait(transfer_timeout(upto - acked_bytes, timeout, min_rate), expect=PushAck)
        acked_bytes = upto
        return acked

    done = False
    try:
        acked = 0
        last = (meta.nbytes - 1) // chunk_size if meta.nbytes else -1
        for i, off in enumerate(range(0, meta.nbytes, chunk_size)):
            sent = i  # chunks sent before this one
            while sent - acked >= window:
                acked = await take_ack()
            end = min(off + chunk_size, meta.nbytes)
            chunk = data[off:end]
            msg = PushChunk(tid, off)
            room = transfer_timeout(end - off, timeout, min_rate)
            if (i + 1) % every == 0 or i == last:
                pending = await transport.submit(peer, msg, [chunk], timeout=room)
                inflight.append((sent + 1, end, pending))
            else:
                await transport.send(peer, msg, [chunk], timeout=room)
        while inflight:
            acked = await take_ack()
        await transport.request(peer, PushEnd(tid), timeout=timeout, expect=PushDone)
        done = True
    finally:
        for _, _, p in inflight:
            p.cancel()
        if not done:
            # the link may be gone: then the receiver expires the transfer by itself
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await transport.send(peer, PushAbort(tid), timeout=1.0)
    return True


async def fetch_shard(
    transport: Transport,
    peer: int,
    rank: int,
    version: int | None = None,
    *,
    into: Callable[[ShardMeta], memoryview] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    window: int = DEFAULT_WINDOW,
    timeout: float = 30.0,  # noqa: ASYNC109 (per message)
    trace: Mapping[str, str] | None = None,
    min_rate: float = DEFAULT_MIN_RATE,
) -> tuple[ShardMeta, memoryview]:
    """Fetch rank ``rank``'s shard (the newest, or ``version``) from ``peer``, verified.

    ``into(meta)`` supplies the destination (e.g. a slot of the local arena); by default a
    new buffer. A range's wait gets ``timeout`` plus its bytes at ``min_rate``. Raises
    LookupError-carrying RemoteError when the peer holds no such replica, ChecksumMismatch
    when the bytes are corrupt (nothing is returned then).
    """
    transfer_timeout(0, timeout, min_rate)  # bad arguments fail before anything is sent
    transport.kinds.register(*KINDS)
    keep_receive_buffers()
    opened = await transport.request(
        peer,
        FetchOpen(rank, -1 if version is None else version),
        timeout=timeout,
        expect=FetchMeta,
        trace=trace,
    )
    fm: FetchMeta = opened.body
    if len(opened.frames) != 1:
        raise ProtocolError("fetch_meta carries exactly one frame: the manifest")
    meta = _meta_in(fm, opened.frames[0].bytes)
    if meta.rank != rank or (version is not None and meta.version != version):
        raise ProtocolError(f"asked for rank {rank} v{version}, got {meta.label}")
    dest = into(meta) if into is not None else anonymous(meta.nbytes)
    if len(dest) < meta.nbytes:
        raise ValueError(f"{meta.label}: destination of {len(dest)} bytes is too small")
    verifier = StreamVerifier.for_shard(meta)
    inflight: deque[tuple[int, int, PendingReply]] = deque()
    corrupt = ""  # told to the holder, which then checks its copy and drops it if bad
    try:
        offsets = iter(range(0, meta.nbytes, chunk_size))
        for off in offsets:
            if len(inflight) >= window:
                await _take_range(inflight, dest, verifier, timeout, min_rate)
            length = min(chunk_size, meta.nbytes - off)
            req = FetchRange(fm.lease, off, length)
            inflight.append((off, length, await transport.submit(peer, req, timeout=timeout)))
        while inflight:
            await _take_range(inflight, dest, verifier, timeout, min_rate)
        if not verifier.complete:  # pragma: no cover - guarded by the loop above
            raise TransferAborted(f"{meta.label}: incomplete fetch")
    except ChecksumMismatch as exc:
        corrupt = str(exc) or "checksum mismatch"
        raise
    finally:
        for _, _, p in inflight:
            p.cancel()
        # the holder expires idle leases by itself if this does not get through
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await transport.request(peer, FetchClose(fm.lease, corrupt), timeout=1.0)
    return meta, dest[: meta.nbytes]


async def _take_range(
    inflight: deque[tuple[int, int, PendingReply]],
    dest: memoryview,
    verifier: StreamVerifier,
    timeout: float,  # noqa: ASYNC109
    min_rate: float,
) -> None:
    off, length, pending = inflight.popleft()
    reply = await pending.wait(transfer_timeout(length, timeout, min_rate), expect=FetchData)
    if reply.body.offset != off or sum(len(f) for f in reply.frames) != length:
        raise ProtocolError(f"fetch: bad reply for range {off}+{length}")
    # hashed in libzmq's buffers and copied into place block by block: one trip through memory
    for frame in reply.frames:
        n = len(frame)
        verifier.feed_into(frame.buffer, dest[off : off + n])
        off += n


async def inventory(transport: Transport, peer: int, timeout: float = 5.0) -> InventoryReply:  # noqa: ASYNC109
    """What replicas ``peer`` holds."""
    transport.kinds.register(*KINDS)
    r = await transport.request(peer, InventoryQuery(), timeout=timeout, expect=InventoryReply)
    body: InventoryReply = r.body
    return body
