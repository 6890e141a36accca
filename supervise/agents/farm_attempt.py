"""One attempt on a farm node: what the node knows of it (`Running`) and how its worker
process runs (`WorkerRunner`: a warm worker of the node's `TaskPool`, or a fresh
`WorkerProcess` for GPU attempts and without a pool, against the agent's journal endpoint,
its token under the attempt's fence, its GPUs its own)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import structlog
import trio

from supervise.tasks._pool_wire import Order
from supervise.tasks.farm_messages import AttemptPhase, StopWhy
from supervise.tasks.host import JournalHost
from supervise.tasks.journal import Outcome
from supervise.tasks.layout import FENCE_ENV
from supervise.tasks.pool import Assigned, PoolUnavailable, TaskPool
from supervise.tasks.runner import AttemptEnd, WorkerProcess, journal_env, pythonpath
from supervise.tasks.spec import TaskSpec
from supervise.tasks.telemetry import trace_env

log = structlog.get_logger("supervise.agents.farm_node")

GPU_ENV = "CUDA_VISIBLE_DEVICES"
LEASE_MARGIN = 0.9
"""A node deems its lease lapsed at this fraction of ``lease_s`` without a renewal."""
INLINE_FINISH_BYTES = 256 << 10
"""A journal up to this size takes a pooled attempt's outcome on the agent's loop (larger:
in a thread, as the whole journal is rewritten with it)."""


@attrs.define(eq=False)
class Running:
    """An attempt this node runs: its assignment, shard, lease and how to stop its worker."""

    task_id: str
    attempt: int
    fence: int
    spec: TaskSpec
    lease_s: float
    shard: int
    renewed_at: float
    trace: Mapping[str, str] = attrs.field(factory=dict)
    fetch_from: tuple[int, ...] = ()
    stop: StopWhy | None = None  # asked to pause or cancel
    finished: bool = False  # its worker exited: only its end is left to report
    zombie: bool = False  # the coordinator said its fence is stale: killed, writes dropped
    refused: int = 0  # worker commits refused (lapsed lease, stale fence)
    outcome_committed: bool = False  # its journal holds this attempt's outcome (end is next)
    pid: int | None = None
    replicas: frozenset[int] = frozenset()
    pushed: tuple[int, int] = (-1, -1)  # (fence, version) last pushed to the peers
    changed: trio.Event = attrs.field(factory=trio.Event)
    pushing: trio.Lock = attrs.field(factory=trio.Lock)  # one push of its journal at a time
    spawned: trio.Event = attrs.field(factory=trio.Event)  # its worker runs (the runner sets)
    ended: trio.Event = attrs.field(factory=trio.Event)
    signal_worker: Callable[[bool], None] | None = None  # (hard) -> SIGKILL, else SIGTERM
    resuming: contextlib.ExitStack | None = None  # the recovery's resume phase, while open
    gpus: tuple[int, ...] = ()  # the devices its worker sees (CUDA_VISIBLE_DEVICES)

    def lapsed(self, now: float) -> bool:
        """Whether the lease ran out without a renewal (the task may run elsewhere now): a
        little early, since the coordinator's lease of an assignment began before the node
        heard of it."""
        return now - self.renewed_at > self.lease_s * LEASE_MARGIN

    def halt(self, *, hard: bool) -> None:
        """Stop the worker: at once (``hard``: a zombie) or letting it checkpoint (SIGTERM)."""
        if self.signal_worker is not None:
            self.signal_worker(hard)


class AttemptRunner(Protocol):
    """Runs one attempt to its end (a worker process by default); sets
    ``run.signal_worker`` once it can be stopped and ``run.spawned`` once it runs."""

    async def __call__(self, run: Running) -> AttemptEnd: ...


class WorkerRunner:
    """Attempts in worker processes writing their journal to ``host``: a warm one of
    ``pool`` (None: none), else (GPU attempts: CUDA_VISIBLE_DEVICES must be set before
    anything imports CUDA) a fresh `WorkerProcess`. ``may_finish``: why an attempt's outcome
    handed back by a warm worker may not be committed now (None: it may), as for a worker's
    own commits."""

    def __init__(
        self,
        host: JournalHost,
        task_dirs: Path,
        *,
        node: str,
        shutdown: float = 5.0,
        on_pid: Callable[[str, int], None] | None = None,
        pool: TaskPool | None = None,
        may_finish: Callable[[Running], Awaitable[str | None]] | None = None,
    ) -> None:
        self.host = host
        self.may_finish = may_finish
        self.task_dirs = task_dirs
        self.node = node
        self.shutdown = shutdown
        self.on_pid = on_pid
        self.pool = pool

    async def __call__(self, run: Running) -> AttemptEnd:
        if self.pool is not None and not run.gpus:
            try:
                return await self._pooled(self.pool, run)
            except PoolUnavailable as exc:
                log.warning("task pool unavailable: a fresh worker", task=run.task_id, why=str(exc))
        return await self._fresh(run)

    async def _pooled(self, pool: TaskPool, run: Running) -> AttemptEnd:
        """The attempt in a warm worker: the same environment a fresh one would get, for
        this attempt only; its end as its worker handed it back (committed here, past the
        same gate as a worker's commit), else read from the journal as for a fresh worker."""
        host = _FencedHost(self.host, run.fence)
        env = {FENCE_ENV: str(run.fence), **devices(run.gpus), **trace_env()}
        env.update(journal_env(host, run.shard, run.attempt))
        held = self.host.service.versions(run.shard)
        order = Order(run.spec.to_bytes(), run.attempt, self.node, env, fresh=not held)

        def started(worker: Assigned) -> None:
            self._started(run, worker.pid, lambda hard: worker.stop(hard=hard), warm=True)

        ended = await pool.run_attempt(order, started)
        if ended.outcome is not None and ended.outcome.attempt == run.attempt:
            why = None if self.may_finish is None else await self.may_finish(run)
            if why is not None:
                return AttemptEnd(None, lost=f"task journal commit refused: {why}")
            await self._finish(run, ended.outcome)
            return AttemptEnd(ended.outcome)
        outcome = await trio.to_thread.run_sync(self._outcome, run.shard)
        if outcome is not None and outcome.attempt == run.attempt:
            return AttemptEnd(outcome)
        return AttemptEnd(None, lost=ended.lost or "task worker ended without an outcome")

    async def _finish(self, run: Running, outcome: Outcome) -> None:
        """Commit ``outcome`` to the task's journal as its attempt's fence (in a thread when
        the journal, rewritten whole with it, is large)."""

        def write() -> None:
            self.host.journal(run.shard, run.fence).finish(outcome)

        held = self.host.service.versions(run.shard)
        size = len(outcome.value or b"") + max((v.nbytes for v in held), default=0)
        if size <= INLINE_FINISH_BYTES:
            write()
        else:
            await trio.to_thread.run_sync(write)

    def _started(
        self, run: Running, pid: int, signal_worker: Callable[[bool], None], **extra: object
    ) -> None:
        """An attempt's worker runs (warm or fresh): book it, and stop it at once if the
        attempt turned stale or was asked to stop while it started."""
        run.pid = pid
        run.spawned.set()
        run.signal_worker = signal_worker
        log.info("task worker started", task=run.task_id, fence=run.fence, pid=pid, **extra)
        if self.on_pid is not None:
            self.on_pid(run.task_id, pid)
        if run.zombie:
            run.halt(hard=True)
        elif run.stop is not None:
            run.halt(hard=False)

    def _outcome(self, shard: int) -> Any:
        return self.host.journal(shard).outcome()

    async def _fresh(self, run: Running) -> AttemptEnd:
        def started(_attempt: int, handle: Any) -> None:
            self._started(
                run,
                handle.pid,
                lambda hard: handle.signal(signal.SIGKILL if hard else signal.SIGTERM),
            )

        launcher = WorkerProcess(
            run.spec,
            self.task_dirs / _safe(run.task_id),
            node=self.node,
            env={FENCE_ENV: str(run.fence), **devices(run.gpus)},
            on_started=started,
            shutdown=self.shutdown,
            host=_FencedHost(self.host, run.fence),
            shard=run.shard,
        )
        return await launcher(run.attempt)


def pool_env() -> dict[str, str]:
    """A warm worker's own environment (each attempt's is set on top, for that attempt): this
    supervise importable, no GPU (GPU attempts get fresh processes), and no journal, token or
    trace of this process inherited."""
    env = {"PYTHONPATH": pythonpath(), **devices(()), **journal_env(None, 0, 1)}
    env.update(dict.fromkeys(trace_env(), ""))
    return env


def devices(gpus: tuple[int, ...]) -> dict[str, str]:
    """The worker's view of the node's GPUs: only those its attempt was given (none: none)."""
    return {GPU_ENV: ",".join(map(str, gpus))}


class _FencedHost(JournalHost):
    """The journal host as one attempt sees it: its worker's token is issued under the
    attempt's fence (the grant's generation), so the agent tells its requests from those of
    an older attempt's worker of the same task not yet dead."""

    def __init__(self, host: JournalHost, fence: int) -> None:
        super().__init__(host.service, host.endpoint)
        self.fence = fence

    def token(self, shard: int, attempt: int) -> str:
        return super().token(shard, self.fence)


def _safe(task_id: str) -> str:
    """A directory name for a task id."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)[:100] or "task"


def end_phase(run: Running, end: AttemptEnd) -> tuple[AttemptPhase, dict[str, Any]]:
    """What an attempt's end is reported as."""
    o = end.outcome
    if o is not None and o.ok:
        return AttemptPhase.COMPLETED, {"result": o.value}
    if run.stop is StopWhy.CANCEL:
        return AttemptPhase.CANCELLED, {}
    if run.stop is StopWhy.PAUSE and (o is None or not o.ok):
        return AttemptPhase.PAUSED, {}
    if o is not None:
        return AttemptPhase.ERRORED, {
            "error": f"{o.error_type}: {o.message}",
            "error_mro": list(o.error_mro),
        }
    return AttemptPhase.ERRORED, {"error": end.lost, "error_mro": ["WorkerLost"]}
