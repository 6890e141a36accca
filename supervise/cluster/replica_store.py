"""Sans-IO store of peers' shards: receptions in progress, verified replicas, a memory budget.

Rules (each one tested):

- a reception becomes a servable :class:`Replica` only when every byte arrived in order and
  every tensor matched its checksum; a partial or corrupt one is dropped, never served;
- a newer version (by ``(generation, version)``) of a rank supersedes that rank's reception in
  flight; an older one is refused as stale; one already held is not transferred again;
- per rank the newest ``keep_last`` replicas are kept; the newest complete replica of a rank is
  never evicted to make room for something that has not arrived yet;
- a *protected* version (`protect`: the cluster's recoverable point and its candidate) is kept
  whatever ``keep_last`` says and never evicted for room, and a push of it is taken even when
  a newer replica of the rank is held already;
- chunks are kept in the buffers they arrived in (verified there, never copied: `Held`);
- every byte announced for a reception counts against ``budget`` from its start; a push that
  cannot fit even after evicting older replicas is refused, and what is held stays intact;
- with a ``shared`` :class:`MemoryBudget` (the node's, which its own arenas reserve from too)
  the bytes are reserved there as well, and a local arena that does not fit may reclaim
  older replicas and any reception in flight (a push never starves the node's own
  snapshots), never a rank's newest replica;
- an announced size must be plausible: at most `GROWTH` times the rank's newest held replica
  (plus `SLACK`) or the rank's fair share of the budget (the budget over the ranks held),
  whichever is larger, so one small header cannot reserve the budget for a rank of a known
  size, while a rank whose state legitimately grows (optimizer state appearing) is never
  locked out;
- an expired reception's memory, one from a peer found lost, or what the node's arenas
  reclaimed goes back to the system at once (``malloc_trim``: not kept by malloc for reuse).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import attrs

from supervise.cluster._buffers import round_up
from supervise.cluster._held import Held
from supervise.cluster._malloc import give_back_free_memory
from supervise.cluster.errors import ChecksumMismatch, Declined, ProtocolError
from supervise.cluster.shard import ShardMeta, StreamVerifier
from supervise.snapshot.budget import MemoryBudget

#: How much larger than a rank's newest held replica its next one may be announced (an
#: optimizer's state appears after the first step: a snapshot may grow by its size)...
GROWTH = 4
#: ...plus this many bytes (small shards may grow by more than a factor).
SLACK = 64 << 20


class Refused(Declined):
    """The store will not take a shard; ``reason`` is one of stale, budget, too_big."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


@attrs.define(slots=True, eq=False)
class Replica:
    """A complete, verified shard of a peer, servable to fetchers."""

    meta: ShardMeta
    held: Held = attrs.field(repr=False)
    source: int | None
    completed_at: float
    pins: int = 0
    retired: bool = False  # evicted while pinned: released on the last unpin

    def pieces(self) -> list[memoryview]:
        """The data region as the buffers it arrived in, in order (zero-copy)."""
        return self.held.pieces()

    def data(self) -> bytes:
        """The data region in one piece (a copy: for checks and tools, not the data path)."""
        return b"".join(self.held.pieces())

    def view(self, offset: int, length: int) -> list[memoryview]:
        """Bytes ``[offset, offset+length)`` of the data region, as views (zero-copy)."""
        if offset < 0 or length < 0 or offset + length > self.meta.nbytes:
            raise ValueError(
                f"range {offset}+{length} outside {self.meta.label} ({self.meta.nbytes} bytes)"
            )
        return self.held.ranges(offset, length)


@attrs.define(slots=True, eq=False)
class Reception:
    """A shard arriving in chunks, in order; verified as it arrives."""

    id: int
    meta: ShardMeta
    held: Held = attrs.field(repr=False)
    source: int | None
    started_at: float
    last_activity: float
    verifier: StreamVerifier = attrs.field(repr=False)
    chunks: int = 0

    @property
    def received(self) -> int:
        return self.verifier.position

    @property
    def complete(self) -> bool:
        return self.verifier.complete

    def accept(self, offset: int, data: memoryview, now: float) -> None:
        """Verify the next chunk where it lies and keep it; ProtocolError / ChecksumMismatch
        on bad input."""
        pos = self.verifier.position
        if offset != pos:
            raise ProtocolError(f"{self.meta.label}: chunk at {offset}, expected {pos}")
        if len(data) > self.meta.nbytes - pos:
            raise ProtocolError(f"{self.meta.label}: chunk runs past {self.meta.nbytes} bytes")
        self.verifier.feed(data)
        self.held.append(data)
        self.chunks += 1
        self.last_activity = now


class ReplicaStore:
    """Peers' shards held in this node's RAM within ``budget`` bytes (and within ``shared``,
    the node's budget for arenas and replicas together, when given).

    Not thread-safe: use it from one thread (the agent's trio thread); a reservation in the
    shared budget from another thread never reclaims from this store.
    """

    def __init__(
        self, budget: int, *, keep_last: int = 1, shared: MemoryBudget | None = None
    ) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"budget = {budget!r}: must be an integer >= 0 (bytes)")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last = {keep_last!r}: must be an integer >= 1")
        self.budget = budget if shared is None else min(budget, shared.limit)
        self.shared = shared
        self._thread = threading.get_ident()
        if shared is not None:
            shared.add_reclaimer(self.reclaim)
        self.keep_last = keep_last
        self._replicas: dict[int, list[Replica]] = {}  # rank -> newest first
        self._receptions: dict[int, Reception] = {}
        self._in_use = 0  # bytes budgeted for replicas (incl. retired but pinned), receptions
        self._ids = itertools.count(1)
        self._protected: frozenset[tuple[int, int]] = frozenset()  # (generation, version)

    # ---- accounting ----------------------------------------------------------------------

    @property
    def held_bytes(self) -> int:
        """Every byte this store holds: replicas and receptions."""
        return self._in_use

    @property
    def free_bytes(self) -> int:
        """Bytes a new buffer may take now (less than ``budget - held_bytes`` when the shared
        budget is the tighter one)."""
        own = self.budget - self.held_bytes
        return own if self.shared is None else min(own, self.shared.free)

    # ---- queries -------------------------------------------------------------------------

    def replicas(self, rank: int) -> list[Replica]:
        """Complete replicas of a rank, newest first."""
        return list(self._replicas.get(rank, ()))

    def get(self, rank: int, version: int | None = None) -> Replica | None:
        """The newest replica of ``rank`` (at ``version`` if given)."""
        for r in self._replicas.get(rank, ()):
            if version is None or r.meta.version == version:
                return r
        return None

    def inventory(self) -> dict[int, list[tuple[int, int]]]:
        """rank -> [(version, generation)] of complete replicas, newest first."""
        return {
            rank: [(r.meta.version, r.meta.generation) for r in reps]
            for rank, reps in sorted(self._replicas.items())
            if reps
        }

    def receptions(self) -> list[Reception]:
        return list(self._receptions.values())

    def protect(self, orders: frozenset[tuple[int, int]] | set[tuple[int, int]]) -> None:
        """Keep replicas of these ``(generation, version)`` orders, of every rank, until the
        next `protect`; replicas the previous set kept beyond ``keep_last`` go now."""
        self._protected = frozenset(orders)
        for reps in list(self._replicas.values()):
            self._trim(reps)

    @property
    def protected(self) -> frozenset[tuple[int, int]]:
        """The ``(generation, version)`` orders `protect` keeps."""
        return self._protected

    def _trim(self, reps: list[Replica]) -> None:
        """Drop a rank's replicas beyond the newest ``keep_last`` that are not protected."""
        kept = 0
        for rep in list(reps):
            if kept < self.keep_last:
                kept += 1
            elif rep.meta.order not in self._protected:
                self._drop_replica(rep)

    def reception(self, rid: int) -> Reception | None:
        return self._receptions.get(rid)

    # ---- memory --------------------------------------------------------------------------

    def _evictable(self, keep_rank_newest: bool = True) -> Iterator[Replica]:
        """Replicas that may go to make room, oldest first; never a rank's newest one."""
        cands: list[Replica] = []
        for reps in self._replicas.values():
            start = 1 if keep_rank_newest else 0
            cands.extend(
                r for r in reps[start:] if r.pins == 0 and r.meta.order not in self._protected
            )
        yield from sorted(cands, key=lambda r: r.completed_at)

    def _drop_replica(self, rep: Replica) -> None:
        reps = self._replicas.get(rep.meta.rank, [])
        if rep in reps:
            reps.remove(rep)
            if not reps:
                del self._replicas[rep.meta.rank]
        if rep.pins:
            rep.retired = True
            return
        self._free(rep.held)

    def _free(self, held: Held) -> int:
        """Let ``held``'s buffers go and take them off the budgets; returns the bytes."""
        held.release()
        self._in_use -= held.capacity
        if self.shared is not None:
            self.shared.release(held.capacity)
        return held.capacity

    def _allocate(self, nbytes: int, label: str) -> Held:
        """Budget ``nbytes`` for a reception, evicting older replicas when needed."""
        need = round_up(max(nbytes, 1))
        if need > self.budget:
            raise Refused(
                "too_big", f"{label} needs {need} bytes, the replica budget is {self.budget}"
            )
        while not self._room_for(need):
            victim = next(self._evictable(), None)
            if victim is None:
                raise Refused(
                    "budget",
                    f"{label} needs {need} bytes; {max(self.free_bytes, 0)} of {self.budget} "
                    "free and nothing older to evict",
                )
            self._drop_replica(victim)
        self._in_use += need
        return Held(need)

    def _room_for(self, need: int) -> bool:
        """Whether a new buffer of ``need`` bytes fits; reserves it in the shared budget."""
        if self.held_bytes + need > self.budget:
            return False
        return self.shared is None or self.shared.try_reserve(need)

    def reclaim(self, need: int) -> int:
        """Free up to ``need`` bytes for the node's own arenas (a :class:`MemoryBudget`
        reclaimer): older replicas first, then pushes in flight; never a rank's newest
        replica, nothing pinned, and nothing when called from another thread. The freed
        buffers go back to the system at once (not kept by malloc for the next reception)."""
        if threading.get_ident() != self._thread:
            return 0
        freed = 0
        while freed < need:
            victim = next(self._evictable(), None)
            if victim is None:
                break
            self._drop_replica(victim)  # never pinned (see _evictable): freed at once
            freed += victim.held.capacity
        # a push in flight gives way too: its sender is refused and offers it again later
        for rec in sorted(self._receptions.values(), key=lambda r: -r.held.capacity):
            if freed >= need:
                break
            freed += self._free(self._receptions.pop(rec.id).held)
        if freed:
            give_back_free_memory()
        return freed

    def release(self, rid: int) -> int:
        """Drop a reception and give its memory back to the system at once (not kept by
        malloc for reuse: its sender died, or its size was a lie); returns the bytes."""
        rec = self._receptions.pop(rid, None)
        if rec is None:
            return 0
        freed = self._free(rec.held)
        give_back_free_memory()
        return freed

    # ---- transfers -----------------------------------------------------------------------

    def _share(self, rank: int) -> int:
        """``rank``'s fair share of the budget: the budget over the ranks held (it included)."""
        return self.budget // len(self._replicas.keys() | {rank})

    def _plausible(self, rank: int, held: int) -> int:
        """The largest size ``rank`` may announce when its newest replica has ``held`` bytes."""
        return max(GROWTH * held + SLACK, self._share(rank))

    def begin(self, meta: ShardMeta, source: int | None, now: float) -> Reception | None:
        """Start receiving ``meta``; None when it is already held. Raises Refused."""
        if any(r.meta.order == meta.order for r in self._replicas.get(meta.rank, ())):
            return None
        protected = meta.order in self._protected
        newest = self.get(meta.rank)
        if newest is not None and newest.meta.order > meta.order and not protected:
            raise Refused("stale", f"{meta.label} is older than the held {newest.meta.label}")
        if newest is not None and meta.nbytes > self._plausible(meta.rank, newest.meta.nbytes):
            raise Refused(
                "too_big",
                f"{meta.label} announces {meta.nbytes} bytes, the held {newest.meta.label} has "
                f"{newest.meta.nbytes} (at most {GROWTH}x + {SLACK >> 20} MiB, or the rank's "
                f"share of the budget, {self._share(meta.rank)})",
            )
        for rec in list(self._receptions.values()):
            if rec.meta.rank != meta.rank:
                continue
            if rec.meta.order != meta.order and (protected or rec.meta.order in self._protected):
                continue  # a protected version and another one: both go on
            if rec.meta.order > meta.order:
                raise Refused("stale", f"{meta.label} is older than {rec.meta.label} in flight")
            self.abort(rec.id)  # superseded (or the same version pushed again)
        verifier = StreamVerifier.for_shard(meta)  # a bad manifest fails before any budget
        held = self._allocate(meta.nbytes, meta.label)
        rec = Reception(
            id=next(self._ids),
            meta=meta,
            held=held,
            source=source,
            started_at=now,
            last_activity=now,
            verifier=verifier,
        )
        self._receptions[rec.id] = rec
        return rec

    def chunk(self, rid: int, offset: int, data: memoryview, now: float) -> Reception:
        """Add a chunk to a reception; a bad chunk aborts the whole reception and raises.

        ``data`` is kept, not copied (a received frame's buffer): it must never change after.
        """
        rec = self._receptions.get(rid)
        if rec is None:
            raise ProtocolError(f"no reception {rid} (superseded, expired or never begun)")
        try:
            rec.accept(offset, data, now)
        except (ProtocolError, ChecksumMismatch):
            self.abort(rid)
            raise
        return rec

    def finish(self, rid: int, now: float) -> Replica:
        """Make a complete reception servable; an incomplete one is aborted (ProtocolError)."""
        rec = self._receptions.get(rid)
        if rec is None:
            raise ProtocolError(f"no reception {rid} (superseded, expired or never begun)")
        if not rec.complete:
            self.abort(rid)
            raise ProtocolError(
                f"{rec.meta.label}: finished after {rec.received} of {rec.meta.nbytes} bytes"
            )
        del self._receptions[rid]
        rep = Replica(meta=rec.meta, held=rec.held, source=rec.source, completed_at=now)
        reps = self._replicas.setdefault(rec.meta.rank, [])
        reps.append(rep)
        reps.sort(key=lambda r: r.meta.order, reverse=True)
        self._trim(reps)
        return rep

    def abort(self, rid: int) -> Reception | None:
        """Drop a reception; what it had received is never served."""
        rec = self._receptions.pop(rid, None)
        if rec is not None:
            self._free(rec.held)
        return rec

    def expire(self, now: float, idle: float) -> list[Reception]:
        """Abort receptions that got nothing for ``idle`` seconds (their sender died)."""
        stale = [r for r in self._receptions.values() if now - r.last_activity >= idle]
        for r in stale:
            self.release(r.id)
        return stale

    # ---- fetches -------------------------------------------------------------------------

    def pin(self, rank: int, version: int | None = None) -> Replica | None:
        """Keep a replica from eviction while a fetch reads it."""
        rep = self.get(rank, version)
        if rep is not None:
            rep.pins += 1
        return rep

    def discard(self, rep: Replica) -> None:
        """Drop a replica found corrupt: never served or listed again (a pinned one is
        released on its last unpin)."""
        self._drop_replica(rep)

    def unpin(self, rep: Replica) -> None:
        rep.pins = max(0, rep.pins - 1)
        if rep.pins == 0 and rep.retired:
            rep.retired = False
            self._free(rep.held)

    def close(self) -> None:
        """Release every buffer (the store is unusable afterwards)."""
        for rid in list(self._receptions):
            self.abort(rid)
        for reps in list(self._replicas.values()):
            for r in list(reps):
                r.pins = 0
                self._drop_replica(r)
        if self.shared is not None:
            self.shared.remove_reclaimer(self.reclaim)
