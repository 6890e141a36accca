"""The node's replication engine: serve replicas, push local commits, fetch lost shards.

- Serves its :class:`ReplicaStore` (pushes in, fetches out) on the node's transport.
- Pushes every newly committed local shard to the rank's group peers (placement), one pusher
  per (peer, rank) in the background: the local capture never waits for it. A push in flight
  runs to its end and then the newest version goes, the ones committed meanwhile skipped: a
  newer commit that cancelled the push in flight would starve replication whenever a push
  takes longer than a step, and would release the arena slot while libzmq may still read the
  chunks queued from it (zero-copy). *Priority* versions (`prioritize`: the cluster's
  recoverable point and its target) go before the newest, so every rank's peers get the same
  version. With ``every`` (`Replication.every_seconds`) the newest goes at most once per
  ``every`` seconds, and only when twice as late while a priority version ahead of it is
  still to come: the recoverable point's rounds (spaced by as much) are then what is
  replicated. Failed pushes are retried with backoff; a peer that membership reports lost is
  skipped until it is back, and one that restarted (new incarnation, RAM gone) gets the
  latest shard again.
- :meth:`fetch` pulls a shard this node should own but lacks (a replacement node) from the
  first live holder, verifies it, and hands it to :class:`LocalShards`.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from typing import Any

import attrs
import structlog
import trio

from supervise._validation import number
from supervise.cluster.access import ReplicaAccess
from supervise.cluster.errors import ClusterError, RemoteError
from supervise.cluster.failure_detector import Event, PeerBack, PeerLost
from supervise.cluster.local import LocalShards
from supervise.cluster.placement import Placement
from supervise.cluster.replica_store import Replica, ReplicaStore
from supervise.cluster.replication import (
    DEFAULT_CHUNK,
    DEFAULT_MIN_RATE,
    DEFAULT_WINDOW,
    ReplicaEndpoint,
    fetch_shard,
    push_shard,
)
from supervise.cluster.shard import ShardMeta
from supervise.cluster.transport import Transport
from supervise.runtime import Backoff
from supervise.telemetry import SnapshotOp, inject, snapshot_span

log = structlog.get_logger("supervise.cluster.replicator")

MiB = 1 << 20


@attrs.frozen(slots=True)
class ReplicationTuning:
    """Transfer knobs (defaults suit loopback and datacenter links alike)."""

    chunk_size: int = attrs.field(default=DEFAULT_CHUNK, validator=number(ge=4096, integer=True))
    window: int = attrs.field(default=DEFAULT_WINDOW, validator=number(ge=1, le=64, integer=True))
    message_timeout: float = attrs.field(default=30.0, validator=number(gt=0))
    # bytes/s a transfer must keep up: waits for bytes get message_timeout + bytes / min_rate
    min_rate: float = attrs.field(default=DEFAULT_MIN_RATE, validator=number(gt=0))
    idle_timeout: float = attrs.field(default=60.0, validator=number(gt=0))
    retry: Backoff = attrs.field(factory=lambda: Backoff(initial=0.5, max=10.0, jitter=0.2))


class _Pusher:
    """State of the pushes of one local rank to one peer."""

    __slots__ = (
        "acked",
        "delivered",
        "failures",
        "inflight",
        "last",
        "refused",
        "scope",
        "wake",
    )

    def __init__(self) -> None:
        self.delivered: tuple[int, int] | None = None  # newest order the peer is known to hold
        self.acked: list[tuple[int, int]] = []  # recent orders the peer took, oldest first
        # priority orders the peer declined as stale, and when (offered again after a while)
        self.refused: dict[tuple[int, int], float] = {}
        self.inflight: tuple[int, int] | None = None
        self.scope: trio.CancelScope | None = None
        self.wake = trio.Event()
        self.failures = 0
        self.last = -math.inf  # when the last push started (trio time)

    def poke(self) -> None:
        self.wake.set()

    def ack(self, order: tuple[int, int]) -> None:
        """The peer holds ``order`` now."""
        if self.delivered is None or order > self.delivered:
            self.delivered = order
        if order not in self.acked:
            self.acked = [*self.acked, order][-_ACKED:]

    def forget(self) -> None:
        """The peer restarted: its RAM, and every replica in it, is gone."""
        self.delivered = None
        self.acked = []
        self.refused = {}


_ACKED = 8  # orders remembered per pusher: enough for the newest and the priority versions
# seconds before a priority version the peer declined as stale is offered again (it may not
# have heard of it yet: the nodes learn the recoverable point's target a heartbeat apart)
_REFUSED_RETRY = 1.0


class ReplicationService:
    """One node's replication: run it with :meth:`run` (while the transport serves)."""

    def __init__(
        self,
        transport: Transport,
        store: ReplicaStore,
        local: LocalShards,
        placement: Placement,
        *,
        node: int,
        tuning: ReplicationTuning | None = None,
        ranks_per_node: int | None = None,
        every: float = 0.0,
    ) -> None:
        """``ranks_per_node``: the training ranks each node runs (rank R on node
        R // ranks_per_node); given, pushes and fetches are checked against the placement
        (`ReplicaAccess`), as a node agent does; None serves anyone (tests). ``every``: seconds
        at least between a rank's pushes of its newest version to a peer (0: every commit)."""
        if not 0 <= node < len(placement):
            raise ValueError(f"node {node} is not in a placement of {len(placement)} nodes")
        if not every >= 0:
            raise ValueError(f"every must be >= 0 seconds, got {every}")
        self.every = every
        self.transport = transport
        self.store = store
        self.local = local
        self.placement = placement
        self.node = node
        self.tuning = tuning or ReplicationTuning()
        access = None if ranks_per_node is None else ReplicaAccess(placement, node, ranks_per_node)
        self.endpoint = ReplicaEndpoint(
            transport,
            store,
            max_chunk=max(self.tuning.chunk_size, transport.limits.max_frame_size),
            access=access,
        )
        self._pushers: dict[tuple[int, int], _Pusher] = {}
        self._down: set[int] = set()
        self._priority: frozenset[tuple[int, int]] = frozenset()
        self.pushed = 0  # completed pushes (for status and tests)

    # ---- queries -------------------------------------------------------------------------

    def targets(self, rank: int) -> tuple[int, ...]:
        """The peers that hold ``rank``'s shards: this node's group peers (``rank`` is one of
        this node's ranks, or one it is about to own; placement is by node, not by rank)."""
        return tuple(n for n in self.placement[self.node] if n != self.node)

    def acked(self, rank: int, order: tuple[int, int]) -> bool:
        """Whether every group peer is known to hold ``rank``'s shard of ``order``."""
        return all(
            (p := self._pushers.get((peer, rank))) is not None and order in p.acked
            for peer in self.targets(rank)
        )

    def lag(self, rank: int) -> int | None:
        """How many steps the peers' replicas of ``rank`` trail its newest local version (the
        slowest peer; a peer that holds nothing trails by the whole step); None when the rank
        has no version or no peer."""
        meta = self.local.latest(rank)
        peers = self.targets(rank)
        if meta is None or not peers:
            return None
        lags = []
        for peer in peers:
            p = self._pushers.get((peer, rank))
            held = None if p is None else p.delivered
            lags.append(meta.version if held is None else max(0, meta.version - held[1]))
        return max(lags)

    def prioritize(self, orders: frozenset[tuple[int, int]] | set[tuple[int, int]]) -> None:
        """Push these ``(generation, version)`` orders of every local rank before the newest
        (the cluster's recoverable point and its target)."""
        orders = frozenset(orders)
        if orders != self._priority:
            self._priority = orders
            for p in self._pushers.values():
                p.refused = {o: t for o, t in p.refused.items() if o in orders}
                p.poke()

    def status(self) -> dict[str, Any]:
        """Held replicas, local versions and pushes in flight (for `supervise status`)."""
        local = {}
        for r in self.local.ranks():
            meta = self.local.latest(r)
            if meta is not None:
                local[r] = (meta.version, meta.generation)
        return {
            "node": self.node,
            "local": local,
            "replicas": self.store.inventory(),
            "held_bytes": self.store.held_bytes,
            "budget": self.store.budget,
            "lag": {r: lag for r in self.local.ranks() if (lag := self.lag(r)) is not None},
            "pushing": sorted(
                (peer, rank, p.inflight[1])
                for (peer, rank), p in self._pushers.items()
                if p.inflight is not None
            ),
            "peers_down": sorted(self._down),
        }

    # ---- inputs --------------------------------------------------------------------------

    def committed(self, rank: int) -> None:
        """A local shard of ``rank`` was committed: push it once the push in flight ended."""
        for peer in self.targets(rank):
            p = self._pushers.get((peer, rank))
            if p is not None:
                # A push in flight is not cancelled: it finishes, then the newest goes
                # (versions committed meanwhile are skipped). Cancelling would starve
                # replication whenever a push takes longer than a step, and would release the
                # arena slot while libzmq may still be reading the chunks queued from it
                # (zero-copy): the peer would see them overwritten by a newer capture.
                p.poke()

    def membership_event(self, event: Event) -> None:
        """Feed peer_lost / peer_back from membership."""
        if isinstance(event, PeerLost):
            self._down.add(event.rank)
            self.endpoint.drop_from(event.rank)
            for (peer, _), p in self._pushers.items():
                if peer == event.rank and p.scope is not None:
                    p.scope.cancel()
        elif isinstance(event, PeerBack):
            self._down.discard(event.rank)
            for (peer, _), p in self._pushers.items():
                if peer == event.rank:
                    if event.restarted:
                        p.forget()  # its RAM is gone: push again
                    p.failures = 0
                    p.poke()

    # ---- running -------------------------------------------------------------------------

    async def run(
        self,
        *,
        events: trio.MemoryReceiveChannel[Event] | None = None,
        task_status: trio.TaskStatus[ReplicationService] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve and push until cancelled; ``events`` is a membership subscription."""
        self.endpoint.install()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_loop)
                if events is not None:
                    nursery.start_soon(self._watch, events)
                for rank in self.local.ranks():
                    for peer in self.targets(rank):
                        p = self._pushers[(peer, rank)] = _Pusher()
                        p.poke()  # push what is already committed
                        nursery.start_soon(self._push_loop, peer, rank, p)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self.endpoint.uninstall()
            self._pushers.clear()

    async def _watch(self, events: trio.MemoryReceiveChannel[Event]) -> None:
        async with events:
            async for ev in events:
                self.membership_event(ev)

    async def _expire_loop(self) -> None:
        idle = self.tuning.idle_timeout
        while True:
            await trio.sleep(idle / 4)
            self.endpoint.expire(idle)

    async def _push_loop(self, peer: int, rank: int, p: _Pusher) -> None:
        t = self.tuning
        wait = math.inf  # until poked, or until the newest is due
        while True:
            with trio.move_on_after(wait):
                await p.wake.wait()
            p.wake = trio.Event()
            meta, wait = self._next(rank, p, trio.current_time())
            if meta is None:
                continue
            if peer in self._down:
                wait = math.inf  # poked when it is back
                continue
            ok = await self._push_once(peer, meta, p)
            if ok:
                p.failures = 0
                p.poke()  # after a priority version, the newest may still be due
                continue
            if p.wake.is_set():  # a newer commit, or the peer came back: go again at once
                continue
            p.failures += 1
            with trio.move_on_after(t.retry.delay(p.failures, random.random())):
                await p.wake.wait()
            p.poke()

    def _next(self, rank: int, p: _Pusher, now: float) -> tuple[ShardMeta | None, float]:
        """What to push next: a priority version the peer lacks (oldest first), else the
        newest local version if the peer does not hold it and it is due (`every`); and the
        seconds until the next look when nothing is (inf: when poked)."""
        for gen, version in sorted(self._priority):
            if (gen, version) in p.acked:
                continue
            if now - p.refused.get((gen, version), -math.inf) < _REFUSED_RETRY:
                continue
            meta = self.local.meta(rank, version)
            if meta is not None and meta.order == (gen, version):
                return meta, 0.0
        meta = self.local.latest(rank)
        if meta is None or meta.order in p.acked or p.delivered == meta.order:
            return None, math.inf
        due = p.last + self.every
        if self.every and any(g == meta.generation and v > meta.version for g, v in self._priority):
            due += self.every  # a target ahead is what goes: the newest only if it is late
        return (meta, 0.0) if now >= due else (None, due - now)

    async def _push_once(self, peer: int, meta: ShardMeta, p: _Pusher) -> bool:
        t = self.tuning
        p.inflight = meta.order
        p.last = trio.current_time()
        try:
            with trio.CancelScope() as scope:
                p.scope = scope
                with (
                    snapshot_span(
                        SnapshotOp.REPLICATE,
                        node_rank=self.node,
                        peer_rank=peer,
                        snapshot_version=meta.version,
                        generation=meta.generation,
                    ) as span,
                    self.local.open(meta.rank, meta.version) as data,
                ):
                    sent = await push_shard(
                        self.transport,
                        peer,
                        meta,
                        data,
                        chunk_size=t.chunk_size,
                        window=t.window,
                        timeout=t.message_timeout,
                        trace=inject(),
                        min_rate=t.min_rate,
                    )
                    span.set(bytes=meta.nbytes if sent else 0)
                p.ack(meta.order)
                if sent:
                    self.pushed += 1
                    log.info("pushed", shard=meta.label, peer=peer, nbytes=meta.nbytes)
                return True
            return False  # cancelled: the peer was lost
        except RemoteError as exc:
            if exc.reason.startswith("Refused: stale"):
                if meta.order in self._priority:
                    # The peer holds a newer replica and does not keep this one: it moved on
                    # to a newer point or target first (the nodes hear of them a heartbeat
                    # apart). Routine: the newest goes now, this one again a little later.
                    p.refused[meta.order] = trio.current_time()
                    log.info("priority push declined", shard=meta.label, peer=peer)
                else:
                    p.delivered = max(p.delivered or meta.order, meta.order)  # it holds newer
                return True
            log.warning("push refused", shard=meta.label, peer=peer, reason=exc.reason)
            return False
        except (ClusterError, LookupError, trio.ClosedResourceError) as exc:
            log.warning("push failed", shard=meta.label, peer=peer, error=str(exc))
            return False
        finally:
            p.inflight = None
            p.scope = None

    # ---- fetching ------------------------------------------------------------------------

    async def fetch(
        self,
        rank: int,
        version: int | None = None,
        *,
        holders: Sequence[int] | None = None,
    ) -> ShardMeta:
        """Pull ``rank``'s shard (newest, or ``version``) from the first holder that has it,
        verify it, and ingest it into the local shards. Raises LookupError if none has it.
        """
        t = self.tuning
        candidates = [n for n in (holders or self.targets(rank)) if n not in self._down]
        reasons = []
        for peer in candidates:
            try:
                with contextlib.ExitStack() as stack:

                    def into(meta: ShardMeta, stack: contextlib.ExitStack = stack) -> memoryview:
                        view: memoryview = stack.enter_context(self.local.ingest(meta))
                        return view

                    meta, _ = await fetch_shard(
                        self.transport,
                        peer,
                        rank,
                        version,
                        into=into,
                        chunk_size=t.chunk_size,
                        window=t.window,
                        timeout=t.message_timeout,
                        min_rate=t.min_rate,
                    )
                log.info("fetched", shard=meta.label, peer=peer, nbytes=meta.nbytes)
                return meta
            except (ClusterError, LookupError) as exc:
                reasons.append(f"node {peer}: {exc}")
        what = "the newest version" if version is None else f"version {version}"
        raise LookupError(
            f"no live holder could provide {what} of rank {rank}"
            + (f" ({'; '.join(reasons)})" if reasons else " (no live holder)")
        )

    def replica(self, rank: int, version: int | None = None) -> Replica | None:
        return self.store.get(rank, version)
