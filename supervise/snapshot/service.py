"""ArenaService: the agent side of the local protocol, sans-IO (a request in, a reply out).

It owns the arenas of the workers on one node, their committed pointers and retention, and
gives the node agent what it needs: hooks on commit (replicate / persist), heartbeat (the
Monitor) and corruption, pinned read access to a committed shard, ingestion of a shard
fetched from a peer or disk, and a restore target that overrides a worker's ``which``.
The standalone Snapshotter hosts one in-process. Thread-safe: hosts may call it from any
thread.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from supervise.runtime.private import private_dirs
from supervise.snapshot import protocol as p
from supervise.snapshot.arena import Arena, SlotState
from supervise.snapshot.budget import MemoryBudget, fmt_bytes
from supervise.snapshot.checksum import mismatches
from supervise.snapshot.errors import (
    CapacityError,
    CorruptSnapshot,
    ProtocolError,
    SnapshotError,
    Unauthorized,
    UnsupportedFormat,
)
from supervise.snapshot.manifest import Manifest
from supervise.snapshot.retention import RetentionRule, VersionInfo, candidates, retained
from supervise.snapshot.tokens import RankTokens

log = logging.getLogger(__name__)

FRESH = -1
"""Restore target meaning "start from scratch": the worker's restore finds nothing."""

_ARENA_NAME = re.compile(r"^supervise-(?P<node>.+)-r(?P<rank>\d{5,})-(?P<n>\d{4,})\.arena$")
_NAME_TRIES = 10_000  # names tried past a rank's last one (taken by files of another run)


@attrs.frozen(slots=True)
class Shard:
    """A committed shard, readable while its ``ArenaService.shard`` context is open."""

    rank: int
    manifest: Manifest
    data: memoryview
    raw: bytes  # the manifest's bytes as committed (no need to encode it again)


@attrs.frozen(slots=True)
class Candidate:
    """A version a worker may restore: where it lies and its manifest."""

    info: VersionInfo
    arena: str
    slot: int
    manifest: bytes


@attrs.frozen(slots=True)
class CommitEvent:
    """Passed to commit hooks: which rank committed which version."""

    rank: int
    info: VersionInfo
    manifest: Manifest


@attrs.define(slots=True)
class _Version:
    info: VersionInfo
    manifest: Manifest
    raw: bytes
    arena: Arena
    slot: int
    seq: int


@attrs.define(slots=True)
class _Worker:
    rank: int
    arenas: list[Arena] = attrs.field(factory=list)
    versions: dict[int, _Version] = attrs.field(factory=dict)
    writing: set[tuple[str, int]] = attrs.field(factory=set)
    head: int | None = None
    target: int | None = None
    pinned: frozenset[int] = frozenset()  # steps kept whatever retention says (`pin`)
    hello: p.Hello | None = None
    heartbeat: tuple[int, Mapping[str, float], float] | None = None


class Refusal(enum.StrEnum):
    """Why `ArenaService.handle` refused a request (the keys of ``refused``)."""

    MALFORMED = "malformed"  # not a valid request: undecodable, or a bad argument
    UNAUTHORIZED = "unauthorized"  # no valid token, or another rank's


class ArenaService:
    """Arenas, committed pointers and retention for the workers of one node."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        rule: RetentionRule,
        budget: MemoryBudget,
        node: str = "node",
        policy: Mapping[str, Any] | None = None,
        anonymous: bool = False,
        adopt: bool = True,
        pinned_slots: int = 0,
        tokens: RankTokens | None = None,
    ) -> None:
        """``anonymous``: arena files are unlinked at once (in-process owner); otherwise they
        are named ``supervise-<node>-r<rank>-<n>.arena`` and, with ``adopt``, arenas a previous
        incarnation of this node's agent left in ``directory`` are taken over with their
        committed versions. ``pinned_slots``: slots each arena has beyond the retention rule's,
        for the versions `pin` keeps (the node's recoverable point and its candidate).
        ``tokens``: requests on the wire (`handle`) must carry a token issued there, and act
        only for its rank (the node agent's endpoint); None: every request is trusted (an
        in-process owner, tests)."""
        if pinned_slots < 0:
            raise ValueError(f"pinned_slots = {pinned_slots}: must be >= 0")
        self.pinned_slots = pinned_slots
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", node):
            raise ValueError(f"node name {node!r}: use letters, digits, '.', '_' or '-'")
        self.directory = Path(directory)
        self.rule = rule
        self.budget = budget
        self.node = node
        self.policy: dict[str, Any] = dict(policy or {})
        self._anonymous = anonymous
        self.tokens = tokens
        self.refused: Counter[Refusal] = Counter()  # requests refused on the wire, by reason
        self._lock = threading.RLock()
        self._workers: dict[int, _Worker] = {}
        self._arenas: dict[str, Arena] = {}
        self._pins: Counter[tuple[str, int]] = Counter()
        self._seq = itertools.count(1)
        self._next_name: dict[int, int] = {}  # per rank: arena names are never reused
        self._commit_hooks: list[Callable[[CommitEvent], None]] = []
        self._heartbeat_hooks: list[Callable[[int, int, Mapping[str, float]], None]] = []
        self._pause_hooks: list[Callable[[int, bool], None]] = []
        self._corrupt_hooks: list[Callable[[int, int, str], None]] = []
        self._request_hooks: list[Callable[[p.Request], None]] = []
        if adopt and not anonymous and self.directory.is_dir():
            self._adopt()

    # -- hooks -----------------------------------------------------------------------------

    def add_commit_hook(self, fn: Callable[[CommitEvent], None]) -> None:
        """Call ``fn`` after every commit (replication, persist tier, telemetry)."""
        self._commit_hooks.append(fn)

    def add_heartbeat_hook(self, fn: Callable[[int, int, Mapping[str, float]], None]) -> None:
        """Call ``fn(rank, step, metrics)`` on every worker heartbeat (the Monitor)."""
        self._heartbeat_hooks.append(fn)

    def add_pause_hook(self, fn: Callable[[int, bool], None]) -> None:
        """Call ``fn(rank, paused)`` when a worker says a long phase starts or ended."""
        self._pause_hooks.append(fn)

    def add_corrupt_hook(self, fn: Callable[[int, int, str], None]) -> None:
        """Call ``fn(rank, step, reason)`` when a version fails verification."""
        self._corrupt_hooks.append(fn)

    def add_request_hook(self, fn: Callable[[p.Request], None]) -> None:
        """Call ``fn(request)`` for every decoded worker request before it is served (the
        node agent follows restores and first steps so)."""
        self._request_hooks.append(fn)

    # -- the wire --------------------------------------------------------------------------

    def handle(self, frame: bytes) -> bytes | None:
        """One request frame in, one reply frame out (None for a heartbeat). With ``tokens``,
        a request is served only for the rank its token was issued to."""
        try:
            envelope = p.decode_request(frame)
        except ProtocolError as exc:
            self._refuse(Refusal.MALFORMED, str(exc))
            return p.encode_error(None, str(exc))
        rid, req = envelope.id, envelope.request
        try:
            self._authorize(envelope)
            body = self.dispatch(req)
        except (SnapshotError, ValueError, OSError) as exc:
            if isinstance(exc, Unauthorized):
                self._refuse(Refusal.UNAUTHORIZED, str(exc))
            return None if isinstance(req, p.Heartbeat) else p.encode_error(rid, str(exc))
        return None if body is None else p.encode_reply(rid, body)

    def _authorize(self, envelope: p.Envelope) -> None:
        if self.tokens is None:
            return
        req = envelope.request
        grant = self.tokens.grant(envelope.token)
        if grant is None:
            why = "without a token" if not envelope.token else "with a token not issued here"
            raise Unauthorized(
                f"{req.OP} for rank {req.rank} {why} (a worker's is in {p.TOKEN_ENV})"
            )
        if grant.rank != req.rank:
            raise Unauthorized(f"{req.OP} for rank {req.rank} with the token of rank {grant.rank}")

    def _refuse(self, reason: Refusal, message: str) -> None:
        """Count a refused request; log it while rare (the 1st, 2nd, 4th, 8th... of a reason),
        so a flood of them cannot flood the log."""
        self.refused[reason] += 1
        n = self.refused[reason]
        if n & (n - 1) == 0:
            log.warning("refused a local request (%s, %d so far): %s", reason, n, message)

    def dispatch(self, req: p.Request) -> dict[str, Any] | None:
        """Serve one decoded request; returns the reply body (None: no reply)."""
        for hook in self._request_hooks:
            try:
                hook(req)
            except Exception:
                log.exception("request hook %r failed", hook)
        match req:
            case p.Heartbeat():
                self.heartbeat(req.rank, req.step, req.metrics)
                return None
            case p.Pause():
                self.pause(req.rank, req.paused)
                return {}
            case p.Hello():
                self.hello(req)
                return {
                    "policy": self.policy,
                    "versions": [p.info_to_wire(v) for v in self.versions(req.rank)],
                }
            case p.Attach():
                a = self.attach(req.rank, req.nbytes, req.manifest_capacity)
                return {
                    "arena": str(a.path),
                    "n_slots": a.n_slots,
                    "data_capacity": a.data_capacity,
                    "manifest_capacity": a.manifest_capacity,
                }
            case p.Begin():
                got = self.begin(req.rank)
                return {"arena": got[0] if got else None, "slot": got[1] if got else -1}
            case p.Commit():
                self.commit(req.rank, req.arena, req.slot, req.manifest, source=req.source)
                return {}
            case p.Abort():
                self.abort(req.rank, req.arena, req.slot)
                return {}
            case p.Restore():
                return {
                    "candidates": [
                        {
                            "info": p.info_to_wire(c.info),
                            "arena": c.arena,
                            "slot": c.slot,
                            "manifest": c.manifest,
                        }
                        for c in self.restore(req.rank, req.which)
                    ]
                }
            case p.Restored():
                self.restored(req.rank, req.step)
                return {}
            case p.Corrupt():
                self.corrupt(req.rank, req.step, req.reason)
                return {}
            case p.Versions():
                return {"versions": [p.info_to_wire(v) for v in self.versions(req.rank)]}
        raise ProtocolError(f"unhandled request {req!r}")  # pragma: no cover

    # -- worker-facing operations ----------------------------------------------------------

    def _worker(self, rank: int) -> _Worker:
        if rank < 0:
            raise ValueError(f"rank {rank} must be >= 0")
        w = self._workers.get(rank)
        if w is None:
            w = self._workers[rank] = _Worker(rank)
        return w

    def hello(self, req: p.Hello) -> None:
        """A worker (re)started: slots its previous incarnation left half-written are freed."""
        with self._lock:
            w = self._worker(req.rank)
            for name, slot in w.writing:
                self._arenas[name].mark(slot, SlotState.FREE)
            w.writing.clear()
            w.hello = req

    def attach(self, rank: int, nbytes: int, manifest_capacity: int = 1 << 20) -> Arena:
        """The rank's current arena, replaced by a larger one when ``nbytes`` do not fit.

        Capacity (RAM budget, then free space of the directory) is checked before anything
        is allocated; a failure is a one-line CapacityError and changes nothing.
        """
        if nbytes < 0 or manifest_capacity < 0:
            raise ValueError(f"attach: nbytes {nbytes} and manifest capacity must be >= 0")
        with self._lock:
            w = self._worker(rank)
            cur = w.arenas[-1] if w.arenas else None
            if (
                cur is not None
                and cur.data_capacity >= nbytes
                and cur.manifest_capacity >= manifest_capacity
            ):
                return cur
            n_slots = self.rule.slots + self.pinned_slots
            man_cap = max(manifest_capacity, 1 << 16)
            size = Arena.size_for(data_capacity=nbytes, n_slots=n_slots, manifest_capacity=man_cap)
            what = f"snapshot arena for rank {rank} ({n_slots} slots x {fmt_bytes(nbytes)})"
            self.budget.reserve(size, what)
            try:
                arena = self._create(rank, nbytes, n_slots, man_cap)
            except BaseException:
                self.budget.release(size)
                raise
            w.arenas.append(arena)
            self._arenas[str(arena.path)] = arena
            self._drop_unused_arenas(w)
            return arena

    def _create(self, rank: int, nbytes: int, n_slots: int, man_cap: int) -> Arena:
        private_dirs(self.directory)
        # A name is never reused while this service lives: a worker keeps arenas mapped by
        # name, and a new arena under a dropped one's name would be the old mapping to it.
        first = self._next_name.get(rank, 0)
        for n in range(first, first + _NAME_TRIES):
            name = f"supervise-{self.node}-r{rank:05d}-{n:04d}.arena"
            if self._anonymous:
                name = f"supervise-{self.node}-{os.getpid()}-r{rank:05d}-{n:04d}.arena"
            path = self.directory / name
            if str(path) in self._arenas:
                continue
            self._next_name[rank] = n + 1
            try:
                return Arena.create(
                    path,
                    data_capacity=nbytes,
                    n_slots=n_slots,
                    manifest_capacity=man_cap,
                    rank=rank,
                    unlink=self._anonymous,
                )
            except FileExistsError:
                continue
        raise CapacityError(f"no free arena file name in {self.directory}")  # pragma: no cover

    def begin(self, rank: int) -> tuple[str, int] | None:
        """A free slot of the rank's current arena (marked WRITING), or None when every slot
        is retained, pinned (being persisted or replicated) or being written."""
        with self._lock:
            w = self._worker(rank)
            if not w.arenas:
                raise SnapshotError(f"rank {rank} has no arena: attach first")
            arena = w.arenas[-1]
            name = str(arena.path)
            busy = {(str(v.arena.path), v.slot) for v in w.versions.values()} | w.writing
            for slot in range(arena.n_slots):
                key = (name, slot)
                if key not in busy and self._pins[key] == 0:
                    arena.mark(slot, SlotState.WRITING)
                    w.writing.add(key)
                    return key
            return None

    def commit(
        self, rank: int, arena: str, slot: int, manifest: bytes, *, source: str = "local"
    ) -> VersionInfo:
        """Commit a slot the rank filled; the version replaces one of the same step, and
        retention then frees what is no longer kept."""
        with self._lock:
            w = self._worker(rank)
            key = (arena, slot)
            if key not in w.writing:
                raise SnapshotError(f"rank {rank} commits slot {slot} of {arena} it did not begin")
            m = Manifest.from_bytes(manifest)
            a = self._arenas[arena]
            if m.rank != rank:
                raise SnapshotError(f"rank {rank} commits a manifest of rank {m.rank}")
            if m.nbytes > a.data_capacity:
                raise CapacityError(
                    f"manifest announces {fmt_bytes(m.nbytes)}, the slot holds "
                    f"{fmt_bytes(a.data_capacity)}"
                )
            seq = next(self._seq)
            a.commit(slot, manifest, seq)
            w.writing.discard(key)
            info = VersionInfo(m.step, m.generation, m.wall_time, m.nbytes, dict(m.metrics), source)
            old = w.versions.get(m.step)
            w.versions[m.step] = _Version(info, m, bytes(manifest), a, slot, seq)
            if old is not None:
                self._free(old)
            w.head = m.step
            self._apply_retention(w)
            event = CommitEvent(rank, info, m)
        for hook in self._commit_hooks:
            try:
                hook(event)
            except Exception:
                log.exception("commit hook %r failed", hook)
        return info

    def abort(self, rank: int, arena: str, slot: int) -> None:
        """Give back a slot from ``begin`` without committing it."""
        with self._lock:
            w = self._worker(rank)
            key = (arena, slot)
            if key in w.writing:
                w.writing.discard(key)
                self._arenas[arena].mark(slot, SlotState.FREE)

    def heartbeat(self, rank: int, step: int, metrics: Mapping[str, float]) -> None:
        """Record training progress and tell the heartbeat hooks."""
        with self._lock:
            self._worker(rank).heartbeat = (step, dict(metrics), time.monotonic())
        for hook in self._heartbeat_hooks:
            try:
                hook(rank, step, metrics)
            except Exception:
                log.exception("heartbeat hook %r failed", hook)

    def pause(self, rank: int, paused: bool) -> None:
        """A worker's long phase starts (``paused``) or ended: tell the pause hooks."""
        for hook in self._pause_hooks:
            try:
                hook(rank, paused)
            except Exception:
                log.exception("pause hook %r failed", hook)

    def restore(self, rank: int, which: str | int) -> list[Candidate]:
        """Versions to try, chosen one first then older fallbacks.

        The agent's restore target, when set, overrides ``which`` and allows no fallback: the
        whole cluster restores that one version (`FRESH`: none), so one rank quietly loading
        an older version would break the job. A target that is not held is an error.
        """
        with self._lock:
            w = self._worker(rank)
            if w.target is not None:
                if w.target == FRESH:
                    return []
                v = w.versions.get(w.target)
                if v is None:
                    raise SnapshotError(
                        f"rank {rank}: the restore target, version {w.target}, is not held here"
                    )
                return [Candidate(v.info, str(v.arena.path), v.slot, v.raw)]
            infos = [v.info for v in w.versions.values()]
            chosen = candidates(infos, which, self.rule, w.head)
            return [
                Candidate(
                    c,
                    str(w.versions[c.step].arena.path),
                    w.versions[c.step].slot,
                    w.versions[c.step].raw,
                )
                for c in chosen
            ]

    def restored(self, rank: int, step: int) -> None:
        """The rank loaded ``step``: its timeline is there now; the restore target is used up."""
        with self._lock:
            w = self._worker(rank)
            w.head = step
            w.target = None

    def corrupt(self, rank: int, step: int, reason: str) -> None:
        """Drop a version that failed verification. A version not held here is an error (a
        report about it is no reason to recover)."""
        with self._lock:
            w = self._workers.get(rank)
            v = None if w is None else w.versions.pop(step, None)
            if w is None or v is None:
                raise SnapshotError(f"rank {rank} holds no version {step}: nothing to drop")
            self._free(v)
        log.warning("rank %d version %d is corrupt and was dropped: %s", rank, step, reason)
        for hook in self._corrupt_hooks:
            try:
                hook(rank, step, reason)
            except Exception:
                log.exception("corrupt hook %r failed", hook)

    def versions(self, rank: int) -> list[VersionInfo]:
        """The versions held for ``rank``, oldest step first."""
        with self._lock:
            w = self._workers.get(rank)
            return [] if w is None else [w.versions[s].info for s in sorted(w.versions)]

    # -- agent-facing operations -----------------------------------------------------------

    @property
    def ranks(self) -> list[int]:
        """Ranks this service knows."""
        with self._lock:
            return sorted(self._workers)

    def last_heartbeat(self, rank: int) -> tuple[int, Mapping[str, float], float] | None:
        """(step, metrics, monotonic time) of the rank's last heartbeat."""
        with self._lock:
            w = self._workers.get(rank)
            return None if w is None else w.heartbeat

    def pin(self, rank: int, steps: frozenset[int] | set[int]) -> None:
        """Keep the rank's versions of ``steps`` whatever retention says, until the next
        `pin` (the agent pins the cluster's recoverable point and the version it is building
        towards, so local retention never evicts the only version complete across the
        cluster). Versions a previous pin kept and retention no longer wants go now."""
        with self._lock:
            w = self._worker(rank)
            w.pinned = frozenset(steps)
            self._apply_retention(w)

    def pinned(self, rank: int) -> frozenset[int]:
        """The steps `pin` keeps for ``rank``."""
        with self._lock:
            w = self._workers.get(rank)
            return frozenset() if w is None else w.pinned

    def set_restore_target(self, rank: int, step: int | None) -> None:
        """Make the rank's next restore load exactly ``step`` (`FRESH`: nothing, a start from
        scratch; None: the worker's own choice)."""
        with self._lock:
            self._worker(rank).target = step

    def arena(self, name: str) -> Arena:
        """An arena by its path (in-process owners hand the object itself to the worker)."""
        with self._lock:
            try:
                return self._arenas[name]
            except KeyError:
                raise SnapshotError(f"unknown arena {name!r}") from None

    @contextlib.contextmanager
    def shard(self, rank: int, step: int) -> Iterator[Shard]:
        """Read access to a committed shard; its slot is not reused until the block exits."""
        with self._lock:
            w = self._worker(rank)
            v = w.versions.get(step)
            if v is None:
                raise SnapshotError(f"rank {rank} holds no version {step}")
            key = (str(v.arena.path), v.slot)
            self._pins[key] += 1
        try:
            yield Shard(rank, v.manifest, v.arena.data(v.slot, v.manifest.nbytes), v.raw)
        finally:
            with self._lock:
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]
                    self._drop_unused_arenas(w)

    def ingest(
        self,
        rank: int,
        manifest: Manifest,
        fill: Callable[[memoryview], None],
        *,
        source: str = "peer",
        threads: int = 1,
    ) -> VersionInfo:
        """Bring a shard fetched from a peer or disk into the rank's arena: ``fill`` writes
        the data region, checksums are verified, then it is committed like a capture."""
        with self.ingesting(rank, manifest, source=source, threads=threads) as view:
            fill(view)
        info = self.versions_by_step(rank).get(manifest.step)
        assert info is not None
        return info

    @contextlib.contextmanager
    def ingesting(
        self, rank: int, manifest: Manifest, *, source: str = "peer", threads: int = 1
    ) -> Iterator[memoryview]:
        """``ingest`` as a block: write the data region into the yielded view; on a normal
        exit it is verified and committed, on an exception the slot is given back."""
        self.attach(rank, manifest.nbytes, len(manifest.to_bytes()))
        got = self.begin(rank)
        if got is None:
            raise SnapshotError(f"rank {rank}: no free slot to ingest version {manifest.step}")
        name, slot = got
        try:
            view = self._arenas[name].data(slot, manifest.nbytes)
            yield view
            bad = mismatches(manifest, view, threads=threads)
            if bad:
                raise CorruptSnapshot(
                    f"ingested version {manifest.step} of rank {rank} fails its checksum in "
                    f"{len(bad)} tensor(s), first {bad[0]!r}"
                )
        except BaseException:
            self.abort(rank, name, slot)
            raise
        self.commit(rank, name, slot, manifest.to_bytes(), source=source)

    def versions_by_step(self, rank: int) -> dict[int, VersionInfo]:
        """The versions held for ``rank``, by step."""
        with self._lock:
            w = self._workers.get(rank)
            return {} if w is None else {s: v.info for s, v in w.versions.items()}

    def release(self, rank: int) -> bool:
        """Forget ``rank`` for good: its versions, and its arenas unmapped, removed and given
        back to the budget (a farm node drops a finished task's journal shard so). False, and
        nothing changed, while one of its slots is being written or read."""
        with self._lock:
            w = self._workers.get(rank)
            if w is None:
                return True
            names = {str(a.path) for a in w.arenas}
            if w.writing or any(k[0] in names for k in self._pins):
                return False
            del self._workers[rank]
            for a in w.arenas:
                del self._arenas[str(a.path)]
                a.unlink()
                self.budget.release(a.nbytes)
                a.close()
            return True

    def close(self, *, unlink: bool = True) -> None:
        """Unmap every arena (and remove the files unless ``unlink=False``, for a handover)."""
        with self._lock:
            for a in self._arenas.values():
                if unlink:
                    a.unlink()
                self.budget.release(a.nbytes)
                a.close()
            self._arenas.clear()
            self._workers.clear()

    # -- internals -------------------------------------------------------------------------

    def _free(self, v: _Version) -> None:
        v.arena.mark(v.slot, SlotState.FREE)

    def _apply_retention(self, w: _Worker) -> None:
        keep = retained([v.info for v in w.versions.values()], self.rule, w.head) | w.pinned
        for step in [s for s in w.versions if s not in keep]:
            self._free(w.versions.pop(step))
        self._drop_unused_arenas(w)

    def _drop_unused_arenas(self, w: _Worker) -> None:
        """Older arenas (replaced after a layout grew) go once nothing in them is used."""
        for a in w.arenas[:-1]:
            name = str(a.path)
            used = any(v.arena is a for v in w.versions.values()) or any(
                k[0] == name for k in [*w.writing, *self._pins]
            )
            if not used:
                w.arenas.remove(a)
                del self._arenas[name]
                a.unlink()
                self.budget.release(a.nbytes)
                a.close()

    def _adopt(self) -> None:
        for path in sorted(self.directory.iterdir()):
            m = _ARENA_NAME.match(path.name)
            if not m or m.group("node") != self.node:
                continue
            try:
                arena = Arena.open(path)
            except UnsupportedFormat as exc:
                log.warning("not adopting %s: %s", path, exc)  # another version's: left alone
                continue
            except CorruptSnapshot as exc:
                # this node's, unreadable (e.g. its agent was killed while creating it): it
                # holds nothing to adopt, and nobody else would ever remove it
                log.warning("removing unreadable arena %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                log.warning("not adopting %s: %s", path, exc)
                continue
            try:
                self.budget.reserve(arena.nbytes, f"adopted arena {path.name}")
            except CapacityError as exc:
                log.warning("not adopting %s: %s", path, exc)
                arena.close()
                continue
            w = self._worker(arena.rank)
            w.arenas.append(arena)
            self._arenas[str(path)] = arena
            n = int(m.group("n")) + 1
            self._next_name[arena.rank] = max(self._next_name.get(arena.rank, 0), n)
            for c in arena.committed():
                try:
                    man = Manifest.from_bytes(c.manifest)
                except CorruptSnapshot as exc:
                    log.warning("%s slot %d: %s", path, c.slot, exc)
                    arena.mark(c.slot, SlotState.FREE)
                    continue
                old = w.versions.get(man.step)
                if old is not None and old.seq > c.seq:
                    arena.mark(c.slot, SlotState.FREE)
                    continue
                if old is not None:
                    self._free(old)
                info = VersionInfo(
                    man.step, man.generation, man.wall_time, man.nbytes, dict(man.metrics)
                )
                w.versions[man.step] = _Version(info, man, c.manifest, arena, c.slot, c.seq)
            for slot in range(arena.n_slots):
                if arena.state(slot)[0] is SlotState.WRITING:
                    arena.mark(slot, SlotState.FREE)
        for w in self._workers.values():
            w.arenas.sort(key=lambda a: (a.data_capacity, a.created))
            seqs = [v.seq for v in w.versions.values()]
            if seqs:
                self._seq = itertools.count(max(max(seqs) + 1, next(self._seq)))
                w.head = max(w.versions.values(), key=lambda v: v.seq).info.step
            self._apply_retention(w)
        log.info("adopted arenas for ranks %s from %s", sorted(self._workers), self.directory)
