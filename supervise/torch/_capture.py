"""Capture: copy a training process's state into an arena slot, mostly off the training thread.

What may change before the next optimizer step (buffers, RNG, extras) is copied before
``capture`` returns; parameters and optimizer state are copied by a worker thread (CPU) or on a
side stream (CUDA) while the next forward/backward runs, then checksummed by a thread of the
lowest priority (nice 19: that work has no deadline, so it takes only what the training leaves
of the cores; the copy keeps normal priority, the next optimizer step waits for it) and
committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

import attrs
import torch

from supervise.policy import SnapshotSchedule
from supervise.snapshot.checksum import digests
from supervise.snapshot.client import Owner, Slot
from supervise.snapshot.errors import SnapshotError
from supervise.snapshot.manifest import Layout, Manifest, TensorEntry
from supervise.telemetry import snapshot_span
from supervise.torch import _state
from supervise.torch._copy import (
    ArenaTensors,
    ArenaViews,
    CudaCapture,
    cuda_devices,
    dtype_name,
    memcopy_into_arena,
)

log = logging.getLogger("supervise.torch.snapshotter")

#: The nice value of the thread that checksums and commits captures (the lowest priority).
CHECKSUM_NICE: Final = 19


def _lower_priority() -> None:
    """Give the calling thread (only) the lowest priority, where the OS allows it."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECKSUM_NICE)


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


@attrs.frozen(slots=True)
class Taken:
    """A capture whose slot holds everything but the deferred copies: what ``submit`` needs."""

    job: _Job
    slot: Slot
    manifest: Manifest


class Capturer:
    """The capture side of a Snapshotter: layout, arena slot, the copy in flight (at most one)
    and its background checksum and commit on a single worker thread."""

    def __init__(  # noqa: PLR0917 (the Snapshotter's parts, handed over once)
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        extra: dict[str, _state.Stateful],
        owner: Owner,
        arenas: ArenaViews,
        settings: SnapshotSchedule,
        *,
        rank: int,
        world_size: int,
        generation: int,
        standalone: bool,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.extra = extra
        self._owner = owner
        self._arenas = arenas
        self._settings = settings
        self.rank = rank
        self.world_size = world_size
        self.generation = generation
        self.standalone = standalone
        self._lock = threading.Lock()
        self._job: _Job | None = None
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supervise-capture")
        self._checksum_pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="supervise-checksum", initializer=_lower_priority
        )
        self._layout: Layout | None = None
        self._layout_key: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
        self._streams: dict[torch.device, Any] = {}
        self._staging: dict[torch.device, torch.Tensor] = {}
        self._skip_warned = 0.0
        self.last: CaptureStats | None = None

    def take(self, step: int, metrics: dict[str, float]) -> Taken | None:
        """Collect the state, claim a slot and copy what cannot wait (issuing the device copies
        on CUDA); None, with a warning at most once a minute, when the owner has no free slot."""
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
            return None
        views = self._arenas.of(slot.arena)
        job = _Job(step, layout.nbytes)
        try:
            self._copy_now(cap, layout, slot, views, job)
        except BaseException:
            self._owner.abort(slot)
            raise
        manifest = Manifest(
            step=step,
            generation=self.generation,
            rank=self.rank,
            world_size=self.world_size,
            nbytes=layout.nbytes,
            tensors=layout.entries,
            wall_time=time.time(),
            metrics=metrics,
            extra=cap.tree,
            aliases=cap.aliases,
        )
        return Taken(job, slot, manifest)

    def submit(self, taken: Taken, blocked_s: float) -> None:
        """Hand the rest (deferred copies, checksums, commit) to the worker thread."""
        job = taken.job
        job.blocked_s = blocked_s
        with self._lock:
            self._job = job
        job.future = self._pool.submit(self._finish, job, taken.slot, taken.manifest)

    def wait(self) -> None:
        """Block until the capture in flight is committed (or failed); raise a failure."""
        with self._lock:
            job = self._job
        if job is not None and job.future is not None:
            with contextlib.suppress(BaseException):  # _finish records its own failure
                job.future.result()
            with self._lock:
                if self._job is job:
                    self._job = None
        self.raise_background_error()

    def before_optimizer_step(self) -> None:
        """The optimizer step pre-hook: release the device copies and help finish the CPU ones
        (the step is about to overwrite what they read)."""
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

    def raise_background_error(self) -> None:
        """Raise (once) the failure of a background capture."""
        err, self._error = self._error, None
        if err is not None:
            raise SnapshotError(f"a background capture failed: {err}") from err

    def close(self) -> None:
        """Stop the worker threads once their work is done."""
        self._pool.shutdown(wait=True)
        self._checksum_pool.shutdown(wait=True)

    # -- internals -------------------------------------------------------------------------

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

    def _ensure_arena(self, layout: Layout, cap: _state.Captured) -> None:
        need_manifest = 2 * (len(cap.tree) + 128 * len(layout.entries)) + (64 << 10)
        a = self._arenas.arena
        if a is None or a.data_capacity < layout.nbytes or a.manifest_capacity < need_manifest:
            self._arenas.arena = self._owner.attach(layout.nbytes, need_manifest)

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
            want = self._settings.staging_budget.resolve(total)
            cur = self._staging.get(dev)
            if want <= 0:
                self._staging.pop(dev, None)
            elif cur is None or cur.numel() != want:
                self._staging[dev] = torch.empty(want, dtype=torch.uint8, device=dev)

    def _finish(self, job: _Job, slot: Slot, manifest: Manifest) -> None:
        """Background: finish the copies, checksum, commit (or abort on any failure)."""
        committed = False
        checksum_cpu = 0.0
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
                checksum_cpu = self._copy_checksum_commit(job, slot, manifest)
            committed = True
        except BaseException as exc:
            self._error = exc
            with contextlib.suppress(Exception):
                self._owner.abort(slot)
            log.error("capture of step %d failed: %s", job.step, exc)
        finally:
            self.last = CaptureStats(
                job.step,
                job.nbytes,
                job.blocked_s,
                job.waited_s,
                job.copy_s,
                job.checksum_s,
                committed,
                time.thread_time() - cpu0 + checksum_cpu,
            )

    def _copy_checksum_commit(self, job: _Job, slot: Slot, manifest: Manifest) -> float:
        """Finish the copies here, checksum on the low-priority thread, commit here; returns
        the CPU seconds the low-priority thread spent."""
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
        sums, cpu = self._checksum_pool.submit(self._checksums, slot, manifest).result()
        job.checksum_s = time.perf_counter() - t
        tensors = tuple(
            TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes, h)
            for e, h in zip(manifest.tensors, sums, strict=True)
        )
        # committed from this thread: the low-priority one never holds the agent client's lock
        self._owner.commit(slot, attrs.evolve(manifest, tensors=tensors).to_bytes())
        return cpu

    @staticmethod
    def _checksums(slot: Slot, manifest: Manifest) -> tuple[list[int], float]:
        """The checksums of the filled slot, and the CPU seconds they took."""
        cpu0 = time.thread_time()
        data = slot.arena.data(slot.slot, manifest.nbytes)
        sums = digests(manifest.tensors, data, kind=manifest.checksum)
        return sums, time.thread_time() - cpu0


def any_rank(flag: bool) -> bool:
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
