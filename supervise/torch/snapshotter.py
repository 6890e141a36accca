"""Snapshotter: capture a training process's state into a RAM arena and restore it exactly.

Parameters and optimizer state are copied while the next forward/backward runs (a worker
thread on CPU, a side stream into pinned shared memory on CUDA); an optimizer step
pre-hook waits only if that copy is still running. Buffers, RNG states and ``extra`` objects
are copied before ``step`` returns. Checksums are computed off the training thread and
verified before every restore; a version that fails falls back to the next older one.

The parts: :mod:`._owner` (agent or standalone), :mod:`._capture`, :mod:`._restore`; this
module checks the arguments, keeps the policy's schedule and ties them together.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch

from supervise.policy import CaptureSchedule, Policy
from supervise.snapshot import protocol as p
from supervise.snapshot.errors import SnapshotError
from supervise.snapshot.retention import RetentionRule, VersionInfo, ranked_best
from supervise.torch._capture import Capturer, CaptureStats, any_rank
from supervise.torch._copy import ArenaViews
from supervise.torch._extra import Extra, adapt
from supervise.torch._owner import connect, env_int, rank_world
from supervise.torch._restore import Restorer, RestoreStats

__all__ = ["CaptureStats", "RestoreStats", "Snapshotter"]


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

    ``extra`` maps names to objects with ``state_dict()``/``load_state_dict()``, torch's
    ``DistributedSampler`` (its epoch) or dicts of plain values (restored in place). Give
    the model itself, not its ``DistributedDataParallel`` wrapper: the snapshot's names then
    carry no ``module.`` prefix and load with or without the wrapper.

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
        extra: Mapping[str, Extra] | None = None,
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
        for name in extra or {}:
            if not isinstance(name, str) or "/" in name or not name:
                raise ValueError(f"extra name {name!r} must be a non-empty string without '/'")
        self.extra: dict[str, Extra] = dict(extra or {})
        stateful = {name: adapt(name, obj) for name, obj in self.extra.items()}
        self.model = model
        self.optimizer = optimizer
        self.rank, self.world_size = rank_world()
        self.local_rank = env_int("LOCAL_RANK", 0)
        self.generation = env_int("SUPERVISE_GENERATION", 0)
        self._closed = False
        self._pauses = 0  # nested `pause` blocks open now
        self._ending = False  # the last step is done: what follows is the end of training
        self._total_steps = total_steps
        self.last_restore: RestoreStats | None = None
        hello = p.Hello(self.rank, self.local_rank, self.world_size, self.generation, os.getpid())
        wiring = connect(hello, policy, shm_dir)
        self.standalone = wiring.standalone
        self.policy = wiring.policy
        self._owner = wiring.owner
        self._tier = wiring.tier
        self._persister = wiring.persister
        r = self.policy.retention
        self._rule = RetentionRule(r.keep_last, r.keep_best, r.best_metric, r.best_mode)
        self._arenas = ArenaViews()
        self._capture = Capturer(
            model,
            optimizer,
            stateful,
            self._owner,
            self._arenas,
            self.policy.snapshot,
            rank=self.rank,
            world_size=self.world_size,
            generation=self.generation,
            standalone=self.standalone,
        )
        self._restore = Restorer(
            model,
            optimizer,
            stateful,
            self._owner,
            self._arenas,
            tier=self._tier,
            rule=self._rule,
            standalone=self.standalone,
            threads=max(1, torch.get_num_threads()),
        )
        self._schedule = CaptureSchedule.from_policy(self.policy, total_steps=total_steps)
        self._sched = self._schedule.start(time.time())
        s = self.policy.snapshot
        self._collective = self.world_size > 1 and bool(s.every_seconds or s.on_best)
        self._hook = (
            optimizer.register_step_pre_hook(self._before_optimizer_step) if optimizer else None
        )
        atexit.register(_close_quietly, weakref.ref(self))

    @property
    def last_capture(self) -> CaptureStats | None:
        """What the last capture cost (set once its background work ended)."""
        return self._capture.last

    # -- the training loop's side ----------------------------------------------------------

    def step(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Report a completed training step (the heartbeat) and capture it when the policy's
        schedule says so. Returns whether a capture started."""
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step = {step!r}: must be an integer >= 0")
        values = _metrics(metrics)
        self._capture.raise_background_error()
        self._owner.heartbeat(step, values)
        if self._total_steps is not None and step >= self._total_steps - 1:
            self._end()  # the last step: no more heartbeats, whatever follows takes
        now = time.time()
        due = self._schedule.decide(self._sched, step, now, values) is not None
        if self._collective:
            due = any_rank(due)
        return self._capture_now(step, values) if due else False

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """A long phase runs in this block (an evaluation, a checkpoint to disk, a data
        reload): the agent's hang detector does not judge it by the step history, only by
        ``recovery.heartbeat_timeout`` from the block's start. Blocks may nest; the agent
        is told when the outermost one starts and ends (standalone: nothing to tell)."""
        self._check_open()
        if self._pauses == 0 and not self._ending:
            self._owner.pause(True)
        self._pauses += 1
        try:
            yield
        finally:
            self._pauses -= 1
            if self._pauses == 0 and not (self._closed or self._ending):
                self._owner.pause(False)

    def _end(self) -> None:
        """Training's steps are over (the last of ``total_steps``, or `finish`): tell the
        agent once, as a pause that never ends, so that the final save or evaluation that
        follows is judged by ``recovery.heartbeat_timeout`` alone, not the step history."""
        if not self._ending:
            self._ending = True
            if self._pauses == 0:
                self._owner.pause(True)

    def capture(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Capture now, whatever the schedule. Returns False (with a warning) when the owner
        has no free slot (every slot retained or still being persisted/replicated)."""
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step = {step!r}: must be an integer >= 0")
        return self._capture_now(step, _metrics(metrics))

    def _capture_now(self, step: int, values: dict[str, float]) -> bool:
        """`capture` once its arguments are checked (`step` checked them already)."""
        t0 = time.perf_counter()
        self.wait()
        taken = self._capture.take(step, values)
        if taken is None:
            return False
        self._sched = self._schedule.record(self._sched, step, time.time(), values)
        self._capture.submit(taken, time.perf_counter() - t0)
        return True

    def wait(self) -> None:
        """Block until the capture in flight is copied, checksummed and committed. Call it
        before changing parameters outside ``optimizer.step`` (which waits by itself)."""
        self._capture.wait()

    def _before_optimizer_step(self, *_: Any) -> None:
        # A method of the Snapshotter, not of its capturer: the optimizer's hook keeps the
        # Snapshotter alive (and so closed at exit) as long as the optimizer lives.
        self._capture.before_optimizer_step()

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
        stats = self._restore.restore(which, restore_optimizer)
        if stats is None:
            return None
        best = None
        metric = self._schedule.metric
        if metric:
            rule = attrs.evolve(self._rule, best_metric=metric, best_mode=self._schedule.mode)
            ranked = ranked_best(self._owner.versions(), rule)
            best = ranked[0].metrics[metric] if ranked else None
        self._sched = self._schedule.start(time.time(), step=stats.step, best=best)
        self.last_restore = stats
        return stats.step

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

    def finish(self) -> None:
        """Say that training completed: pending writes are flushed and, standalone, the job is
        marked finished in the persist directory, so a later run of the same job does not
        resume it unless ``SUPERVISE_RESUME_FINISHED=1``. Under a node agent the agent marks
        it once every worker exited 0; this flushes, and tells the agent that no step follows
        (what the process does until it exits is judged by the heartbeat timeout alone)."""
        self._check_open()
        self._end()
        self.flush()
        if self.standalone:
            self._tier.mark_finished()

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
            self._capture.close()
            if self._persister is not None:
                self._persister.close()
            self._arenas.release()
            self._owner.close()

    def _check_open(self) -> None:
        if self._closed:
            raise SnapshotError("this Snapshotter is closed")

    def __enter__(self) -> Snapshotter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
