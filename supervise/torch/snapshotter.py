"""Snapshotter: capture a training process's state into a RAM arena and restore it exactly.

Parameters and optimizer state are copied while the next forward/backward runs (a worker
thread on CPU, a side stream into pinned shared memory on CUDA); an optimizer step
pre-hook waits only if that copy is still running. Buffers, RNG states and ``extra`` objects
are copied before ``step`` returns. Checksums are computed off the training thread and
verified before every restore; a version that fails falls back to the next older one.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import torch

from supervise.policy import CaptureSchedule, Policy
from supervise.snapshot import protocol as p
from supervise.snapshot.arena import Arena
from supervise.snapshot.budget import MemoryBudget, total_ram
from supervise.snapshot.checksum import digests
from supervise.snapshot.client import AGENT_ENV, AgentClient, LocalOwner, Owner, Slot
from supervise.snapshot.errors import CorruptSnapshot, SnapshotError
from supervise.snapshot.manifest import Layout, Manifest, TensorEntry
from supervise.snapshot.persist import Persister, PersistTier
from supervise.snapshot.retention import RetentionRule, VersionInfo, candidates, ranked_best
from supervise.snapshot.service import ArenaService
from supervise.telemetry import snapshot_span
from supervise.torch import _state
from supervise.torch._copy import (
    ArenaTensors,
    CudaCapture,
    copy_and_verify,
    cuda_devices,
    dtype_name,
    memcopy_into_arena,
)

log = logging.getLogger(__name__)

SHM_ENV = "SUPERVISE_SHM_DIR"


@attrs.frozen(slots=True)
class CaptureStats:
    """What one capture cost. ``blocked_s``: time ``capture`` held the training loop;
    ``waited_s``: time the next optimizer step waited for the copy; ``copy_s`` and
    ``checksum_s``: background work (wall time); ``background_cpu_s``: CPU time the
    background thread spent on it (what it takes from training when every core is busy)."""

    step: int
    nbytes: int
    blocked_s: float
    waited_s: float
    copy_s: float
    checksum_s: float
    committed: bool
    background_cpu_s: float = 0.0

    @property
    def stall_s(self) -> float:
        """Total time the training loop was blocked by this capture."""
        return self.blocked_s + self.waited_s


@attrs.frozen(slots=True)
class RestoreStats:
    """What the last restore did: the version, where it came from, bytes, seconds, and how
    many newer versions failed verification first."""

    step: int
    source: str
    nbytes: int
    seconds: float
    fallbacks: int


class _CopyWork:
    """The CPU copies left after ``capture`` returned. The worker thread takes them one by one;
    when the optimizer step arrives before they are done, the training thread takes the rest
    itself (torch's multi-threaded copy) instead of waiting idle."""

    def __init__(self, items: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
        self.items = items
        self._next = 0
        self._left = len(items)
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        if not items:
            self.done.set()

    def run(self, *, helper: bool) -> None:
        """Copy items until none is left (``helper``: on the training thread, via torch)."""
        while True:
            with self._lock:
                if self._next >= len(self.items) or self.error is not None:
                    return
                src, address, dst = self.items[self._next]
                self._next += 1
            try:
                if helper:
                    dst.copy_(src)
                else:
                    memcopy_into_arena(address, src, dst)
            except BaseException as exc:
                self.error = exc
                self.done.set()
                raise
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self.done.set()

    def fail(self, exc: BaseException) -> None:
        """Stop: nothing more will be copied."""
        self.error = exc
        self.done.set()


class _Job:
    """A capture in flight: the background copy, checksums and commit."""

    def __init__(self, step: int, nbytes: int) -> None:
        self.step = step
        self.nbytes = nbytes
        self.work = _CopyWork([])
        self.cuda: CudaCapture | None = None
        self.future: Future[None] | None = None
        self.blocked_s = 0.0
        self.waited_s = 0.0
        self.copy_s = 0.0
        self.checksum_s = 0.0
        self.started_ns = time.time_ns()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SnapshotError(f"{name}={raw!r} in the environment is not an integer") from None
    if value < 0:
        raise SnapshotError(f"{name}={raw!r} in the environment must be >= 0")
    return value


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        if not isinstance(k, str):
            raise TypeError(f"metric name {k!r} must be a string")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"metric {k!r} = {v!r} is not a number") from None
    return out


def _close_quietly(ref: weakref.ref[Snapshotter]) -> None:
    snap = ref()
    if snap is not None:
        with contextlib.suppress(Exception):
            snap.close()


class Snapshotter:
    """Snapshots a model, its optimizer, RNG states and ``extra`` objects into RAM.

    Without ``SUPERVISE_AGENT`` in the environment it runs standalone: the arena lives in this
    process (shared memory, unlinked at once) and the persist tier writes to disk, so a fresh
    process restores from disk; with ``policy=None`` it then persists every snapshot, as it has
    nowhere else that outlives the process. With an agent, the agent owns the arena (a crash
    of this process loses nothing) and its policy applies.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        policy: Policy | None = None,
        extra: Mapping[str, _state.Stateful] | None = None,
        total_steps: int | None = None,
        shm_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
            )
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be a supervise.Policy or None, got {type(policy).__name__}"
            )
        extra = dict(extra or {})
        for name, obj in extra.items():
            if not isinstance(name, str) or "/" in name or not name:
                raise ValueError(f"extra name {name!r} must be a non-empty string without '/'")
            if not callable(getattr(obj, "state_dict", None)) or not callable(
                getattr(obj, "load_state_dict", None)
            ):
                raise TypeError(f"extra[{name!r}] has no state_dict()/load_state_dict()")
        self.model = model
        self.optimizer = optimizer
        self.extra: dict[str, _state.Stateful] = extra
        self.rank, self.world_size = _rank_world()
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.generation = _env_int("SUPERVISE_GENERATION", 0)
        self._threads = max(1, torch.get_num_threads())
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervise-capture")
        self._views: dict[str, ArenaTensors] = {}
        self._layout: Layout | None = None
        self._layout_key: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
        self._arena: Arena | None = None
        self._streams: dict[torch.device, Any] = {}
        self._staging: dict[torch.device, torch.Tensor] = {}
        self._skip_warned = 0.0
        self._closed = False
        self.last_capture: CaptureStats | None = None
        self.last_restore: RestoreStats | None = None
        self._persister: Persister | None = None

        endpoint = os.environ.get(AGENT_ENV, "")
        hello = p.Hello(self.rank, self.local_rank, self.world_size, self.generation, os.getpid())
        self._owner: Owner
        if endpoint:
            self.standalone = False
            self._owner = AgentClient(endpoint, self.rank)
            greeting = self._owner.hello(hello)
            agent_policy = Policy.from_dict(greeting.policy) if greeting.policy else Policy()
            if policy is not None and policy != agent_policy:
                log.warning("the node agent's policy applies; the policy given here is ignored")
            self.policy = agent_policy
        else:
            self.standalone = True
            if policy is None:
                base = Policy()
                policy = attrs.evolve(base, persist=attrs.evolve(base.persist, every_snapshots=1))
            self.policy = policy
            r = policy.retention
            rule = RetentionRule(r.keep_last, r.keep_best, r.best_metric, r.best_mode)
            budget = MemoryBudget(r.memory_budget.resolve(total_ram()))
            directory = Path(shm_dir or os.environ.get(SHM_ENV) or "/dev/shm")
            service = ArenaService(
                directory, rule=rule, budget=budget, node="standalone", anonymous=True
            )
            if policy.persist.every_snapshots:
                self._persister = Persister(
                    service, lambda _r: self._tier, every=policy.persist.every_snapshots
                )
                service.add_commit_hook(self._persister.on_commit)
            self._owner = LocalOwner(service, self.rank)
            self._owner.hello(hello)
        r = self.policy.retention
        self._rule = RetentionRule(r.keep_last, r.keep_best, r.best_metric, r.best_mode)
        self._tier = PersistTier(
            self.policy.persist.path, rank=self.rank, keep=self.policy.persist.keep
        )
        if self.standalone:
            self._tier.clean_temporaries()
        self._schedule = CaptureSchedule.from_policy(self.policy, total_steps=total_steps)
        self._sched = self._schedule.start(time.time())
        s = self.policy.snapshot
        self._collective = self.world_size > 1 and bool(s.every_seconds or s.on_best)
        self._hook = (
            optimizer.register_step_pre_hook(self._before_optimizer_step) if optimizer else None
        )
        atexit.register(_close_quietly, weakref.ref(self))

    # -- the training loop's side ----------------------------------------------------------

    def step(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Report a completed training step (the heartbeat) and capture it when the policy's
        schedule says so. Returns whether a capture started."""
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step = {step!r}: must be an integer >= 0")
        values = _metrics(metrics)
        self._raise_background_error()
        self._owner.heartbeat(step, values)
        now = time.time()
        due = self._schedule.decide(self._sched, step, now, values) is not None
        if self._collective:
            due = _any_rank(due)
        return self.capture(step, values) if due else False

    def capture(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Capture now, whatever the schedule. Returns False (with a warning) when the owner
        has no free slot (every slot retained or still being persisted/replicated)."""
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step = {step!r}: must be an integer >= 0")
        values = _metrics(metrics)
        t0 = time.perf_counter()
        self.wait()
        with torch.no_grad():
            cap = _state.collect(self.model, self.optimizer, self.extra)
        layout = self._plan(cap)
        self._ensure_arena(layout, cap)
        slot = self._owner.begin()
        if slot is None:
            if time.monotonic() - self._skip_warned > 60:
                self._skip_warned = time.monotonic()
                log.warning(
                    "skipping the capture of step %d: no free arena slot (a previous version is "
                    "still being persisted or replicated)",
                    step,
                )
            return False
        views = self._arena_tensors(slot.arena)
        job = _Job(step, layout.nbytes)
        try:
            self._copy_now(cap, layout, slot, views, job)
        except BaseException:
            self._owner.abort(slot)
            raise
        self._sched = self._schedule.record(self._sched, step, time.time(), values)
        manifest = Manifest(
            step=step,
            generation=self.generation,
            rank=self.rank,
            world_size=self.world_size,
            nbytes=layout.nbytes,
            tensors=layout.entries,
            wall_time=time.time(),
            metrics=values,
            extra=cap.tree,
            aliases=cap.aliases,
        )
        job.blocked_s = time.perf_counter() - t0
        with self._lock:
            self._job = job
        job.future = self._pool.submit(self._finish, job, slot, manifest)
        return True

    def wait(self) -> None:
        """Block until the capture in flight is copied, checksummed and committed. Call it
        before changing parameters outside ``optimizer.step`` (which waits by itself)."""
        with self._lock:
            job = self._job
        if job is not None and job.future is not None:
            with contextlib.suppress(BaseException):  # _finish records its own failure
                job.future.result()
            with self._lock:
                if self._job is job:
                    self._job = None
        self._raise_background_error()

    def _before_optimizer_step(self, *_: Any) -> None:
        job = self._job
        if job is None:
            return
        if job.cuda is not None:
            job.cuda.release_wait()
        if not job.work.done.is_set():
            t = time.perf_counter()
            with torch.no_grad(), contextlib.suppress(BaseException):
                job.work.run(helper=True)  # a failure is reported by the capture itself
            job.work.done.wait()
            job.waited_s += time.perf_counter() - t

    # -- capture internals -----------------------------------------------------------------

    def _plan(self, cap: _state.Captured) -> Layout:
        specs = [
            (name, dtype_name(t.dtype), tuple(t.shape))
            for name, t in sorted(cap.tensors.items(), key=lambda kv: kv[0] in cap.background)
        ]
        key = tuple(specs)
        if self._layout is None or self._layout_key != key:
            self._layout = Layout.plan(specs)
            self._layout_key = key
        return self._layout

    def _ensure_arena(self, layout: Layout, cap: _state.Captured) -> Arena:
        need_manifest = 2 * (len(cap.tree) + 128 * len(layout.entries)) + (64 << 10)
        a = self._arena
        if a is None or a.data_capacity < layout.nbytes or a.manifest_capacity < need_manifest:
            a = self._arena = self._owner.attach(layout.nbytes, need_manifest)
        return a

    def _arena_tensors(self, arena: Arena) -> ArenaTensors:
        key = str(arena.path)
        views = self._views.get(key)
        if views is None or views.arena is not arena:
            views = self._views[key] = ArenaTensors(arena)
        return views

    def _copy_now(
        self,
        cap: _state.Captured,
        layout: Layout,
        slot: Slot,
        views: ArenaTensors,
        job: _Job,
    ) -> None:
        """Copy what may change before the next optimizer step now, issue the device copies
        (CUDA), and leave the rest (CPU) to ``job.work``."""
        entries = {e.name: e for e in layout.entries}
        on_cuda = cuda_devices(list(cap.tensors.values()))
        deferred: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        device_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, t in cap.tensors.items():
                e = entries[name]
                dst = views.view(slot.slot, e)
                if t.device.type == "cuda":
                    device_pairs.append((t, dst))
                elif name in cap.background and not on_cuda:
                    deferred.append((t, views.address_of(slot.slot, e), dst))
                else:
                    memcopy_into_arena(views.address_of(slot.slot, e), t, dst)
        if device_pairs:
            views.pin()
            for dev in on_cuda:
                if dev not in self._streams:
                    self._streams[dev] = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
            self._ensure_staging(device_pairs)
            job.cuda = CudaCapture()
            job.cuda.start(device_pairs, self._streams, self._staging)
        job.work = _CopyWork(deferred)

    def _ensure_staging(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        per_dev: dict[torch.device, int] = {}
        for src, _ in pairs:
            per_dev[src.device] = per_dev.get(src.device, 0) + src.numel() * src.element_size()
        for dev, total in per_dev.items():
            want = self.policy.snapshot.staging_budget.resolve(total)
            cur = self._staging.get(dev)
            if want <= 0:
                self._staging.pop(dev, None)
            elif cur is None or cur.numel() != want:
                self._staging[dev] = torch.empty(want, dtype=torch.uint8, device=dev)

    def _finish(self, job: _Job, slot: Slot, manifest: Manifest) -> None:
        """Background: finish the copies, checksum, commit (or abort on any failure)."""
        committed = False
        cpu0 = time.thread_time()
        try:
            # Under a node agent the agent records the capture span: it outlives this process.
            traced = (
                snapshot_span(
                    "capture",
                    start_time_ns=job.started_ns,
                    node_rank=self.rank,
                    rank=self.rank,
                    snapshot_step=job.step,
                    snapshot_version=job.step,
                    generation=self.generation,
                    bytes=job.nbytes,
                )
                if self.standalone
                else contextlib.nullcontext()
            )
            with traced:
                self._copy_checksum_commit(job, slot, manifest)
            committed = True
        except BaseException as exc:
            self._error = exc
            with contextlib.suppress(Exception):
                self._owner.abort(slot)
            log.error("capture of step %d failed: %s", job.step, exc)
        finally:
            self.last_capture = CaptureStats(
                job.step,
                job.nbytes,
                job.blocked_s,
                job.waited_s,
                job.copy_s,
                job.checksum_s,
                committed,
                time.thread_time() - cpu0,
            )

    def _copy_checksum_commit(self, job: _Job, slot: Slot, manifest: Manifest) -> None:
        t = time.perf_counter()
        try:
            job.work.run(helper=False)
        except BaseException as exc:
            job.work.fail(exc)
            raise
        job.work.done.wait()
        if job.work.error is not None:
            raise job.work.error
        if job.cuda is not None:
            job.cuda.synchronize()
        job.copy_s = time.perf_counter() - t
        t = time.perf_counter()
        sums = digests(manifest.tensors, slot.arena.data(slot.slot, manifest.nbytes))
        tensors = tuple(
            TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes, h)
            for e, h in zip(manifest.tensors, sums, strict=True)
        )
        job.checksum_s = time.perf_counter() - t
        self._owner.commit(slot, attrs.evolve(manifest, tensors=tensors).to_bytes())

    def _raise_background_error(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            raise SnapshotError(f"a background capture failed: {err}") from err

    # -- restore ---------------------------------------------------------------------------

    def restore(self, which: str | int = "latest", *, restore_optimizer: bool = True) -> int | None:
        """Load a version in place and return its step; None when there is none (fresh start).

        ``which``: "latest", "best" or a version number (the agent's restore target, when
        set, overrides it). Every checksum is verified; a version that fails is dropped and
        the next older one is tried, with a warning. Falls back to the persist tier on disk
        when RAM holds nothing usable. ``restore_optimizer=False`` loads weights, RNG states
        and extras but leaves the optimizer as it is. If every version fails, raises
        CorruptSnapshot (the model may then be partly overwritten).
        """
        self._check_open()
        if not (
            which in ("latest", "best")
            or (isinstance(which, int) and not isinstance(which, bool) and which >= 0)
        ):
            raise ValueError(
                f"which = {which!r}: must be 'latest', 'best' or a version number >= 0"
            )
        self.wait()
        t0 = time.perf_counter()
        failures: list[str] = []
        tried_disk = False
        while True:
            for cand in self._owner.restore(which):
                try:
                    self._load(cand.manifest, cand.slot, restore_optimizer)
                except CorruptSnapshot as exc:
                    reason = str(exc)
                    failures.append(f"version {cand.info.step}: {reason}")
                    log.warning(
                        "version %d failed verification (%s); trying the next older one",
                        cand.info.step,
                        reason,
                    )
                    self._owner.corrupt(cand.info.step, reason)
                    continue
                self._owner.restored(cand.info.step)
                self._after_restore(cand.info, time.perf_counter() - t0, len(failures))
                return cand.info.step
            # With an agent, the disk tier is the agent's: it brings what the cluster chose.
            if tried_disk or not self.standalone or not self._ingest_from_disk(which):
                break
            tried_disk = True
        if failures:
            raise CorruptSnapshot("no valid snapshot to restore: " + "; ".join(failures))
        return None

    def _after_restore(self, info: VersionInfo, seconds: float, fallbacks: int) -> None:
        best = None
        metric = self._schedule.metric
        if metric:
            rule = attrs.evolve(self._rule, best_metric=metric, best_mode=self._schedule.mode)
            ranked = ranked_best(self._owner.versions(), rule)
            best = ranked[0].metrics[metric] if ranked else None
        self._sched = self._schedule.start(time.time(), step=info.step, best=best)
        self.last_restore = RestoreStats(info.step, info.source, info.nbytes, seconds, fallbacks)

    def _load(self, manifest: Manifest, slot: Slot, restore_optimizer: bool) -> None:
        plan = _state.plan_restore(
            manifest, self.model, self.optimizer, self.extra, restore_optimizer=restore_optimizer
        )
        views = self._arena_tensors(slot.arena)
        if any(dst.device.type == "cuda" for _, dst in plan.pairs):
            views.pin()
        entries = {e.name: e for e in manifest.tensors}
        items = []
        for name, dst in plan.pairs:
            e = entries[name]
            items.append((e, views.view(slot.slot, e), dst, views.address_of(slot.slot, e)))
        with torch.no_grad():
            bad = copy_and_verify(items, self._threads)
        if bad:
            raise CorruptSnapshot(f"checksum mismatch in {len(bad)} tensor(s), first {bad[0]!r}")
        _state.apply_restore(
            plan, self.model, self.optimizer, self.extra, restore_optimizer=restore_optimizer
        )

    def _ingest_from_disk(self, which: str | int) -> bool:
        """Bring the chosen version from the persist tier into RAM (verified on the way)."""
        entries = self._tier.entries()
        by_step = {e.manifest.step: e for e in entries}
        for info in candidates([e.info for e in entries], which, self._rule, None):
            e = by_step[info.step]
            need = 2 * len(e.manifest.to_bytes()) + (64 << 10)
            self._arena = self._owner.attach(e.manifest.nbytes, need)
            slot = self._owner.begin()
            if slot is None:
                raise SnapshotError("no free arena slot to load a checkpoint from disk into")
            try:
                self._tier.load(
                    e, slot.arena.data(slot.slot, e.manifest.nbytes), threads=self._threads
                )
            except CorruptSnapshot as exc:
                log.warning("skipping checkpoint %s: %s", e.path, exc)
                self._owner.abort(slot)
                continue
            except BaseException:
                self._owner.abort(slot)
                raise
            self._owner.commit(slot, e.manifest.to_bytes(), source="disk")
            return True
        return False

    # -- queries and lifetime --------------------------------------------------------------

    def versions(self) -> list[VersionInfo]:
        """Versions that can be restored: in RAM, and on disk (``source="disk"``) where
        this process reads the persist tier."""
        self._check_open()
        ram = {v.step: v for v in self._owner.versions()}
        for e in self._tier.entries():
            ram.setdefault(e.manifest.step, e.info)
        return [ram[s] for s in sorted(ram)]

    def flush(self) -> None:
        """Wait for the capture in flight and for pending writes to disk (standalone)."""
        self.wait()
        if self._persister is not None:
            self._persister.flush()

    def close(self) -> None:
        """Finish pending work, remove the optimizer hook and release the arena (standalone:
        RAM versions go; what was persisted stays on disk)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._hook is not None:
                self._hook.remove()
            self._pool.shutdown(wait=True)
            if self._persister is not None:
                self._persister.close()
            for v in self._views.values():
                with contextlib.suppress(Exception):
                    v.unpin()
            self._views.clear()
            self._owner.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotError("this Snapshotter is closed")

    def __enter__(self) -> Snapshotter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _any_rank(flag: bool) -> bool:
    """All-reduce MAX of a flag: ranks capture the same steps even with time/metric triggers."""
    import torch.distributed as dist

    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
