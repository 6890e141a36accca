"""This node's side of one restart: fetch the shards it lacks, point every local rank's restore
at the chosen version, spawn the workers, and follow them until they restored and stepped.

`LocalRestart` reports how far it got through a `ProgressReport` (the executor routes that to
the node running the restart) and traces the fetch, restore and resume phases.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog
import trio

from supervise._warm import MASTER_WAIT_ENV, MASTER_WAIT_MET
from supervise.agents import messages as m
from supervise.agents._tracing import active, maybe_phase, slowest_source
from supervise.agents.context import NodeContext
from supervise.agents.lifecycle import CLUSTER_START, RestartProgress
from supervise.agents.replica_holder import REPLICAS, fetch_shard_via
from supervise.agents.workers import ExitCallback, Launch, SparePool, WorkerGroup
from supervise.runtime import whereis
from supervise.runtime.procfs import tcp_port_met
from supervise.snapshot import protocol as p
from supervise.snapshot.persist import JOB_ENV
from supervise.snapshot.service import FRESH
from supervise.telemetry import Phase, RecoveryTrace, Source, untraced

log = structlog.get_logger("supervise.agents.executor")  # a part of the executor's job


class ProgressReport(Protocol):
    """Where a restart stands on this node (``Progress`` to the node running it)."""

    def __call__(
        self, generation: int, phase: RestartProgress, *, nbytes: int = 0, source: str = ""
    ) -> None: ...


class LocalRestart:
    """Restarts this node's workers, one generation at a time, and owns the running ones."""

    def __init__(
        self,
        ctx: NodeContext,
        *,
        spares: SparePool | None,
        on_exit: ExitCallback,
        report: ProgressReport,
    ) -> None:
        self._ctx = ctx
        self._spares = spares
        self._on_exit = on_exit
        self._report = report
        self.workers: WorkerGroup | None = None  # the current generation's
        self._local_changed = trio.Event()
        self._restore_asked: dict[int, int] = {}  # rank -> time_ns of its restore request
        self._restored: dict[int, int] = {}  # rank -> step restored
        self._stepped: set[int] = set()
        # whether the last generation's workers met at its MASTER_PORT (None: not known yet)
        self.met_at_master: bool | None = None

    def local_request(self, req: p.Request) -> None:
        """The arena service's request hook: follow each worker's restore and first step."""
        if isinstance(req, p.Restore):
            self._restore_asked.setdefault(req.rank, time.time_ns())
        elif isinstance(req, p.Restored):
            self._restored[req.rank] = req.step
        elif isinstance(req, p.Heartbeat):
            if req.rank in self._stepped:
                return
            self._stepped.add(req.rank)
        else:
            return
        self._local_changed.set()

    async def run(self, msg: m.Restart, trace: Mapping[str, str], nursery: trio.Nursery) -> None:
        """Restart the workers as ``msg`` says (in ``nursery``); returns once every local rank
        completed a step (reported `RestartProgress.RESUMED`)."""
        ctx = self._ctx
        config = ctx.config
        self._restore_asked.clear()
        self._restored.clear()
        self._stepped.clear()
        ranks = list(config.ranks)
        traced = msg.trigger != CLUSTER_START and bool(trace)
        recovery = (
            RecoveryTrace.join(trace, rank=config.rank, attempt=msg.attempt, trigger=msg.trigger)
            if traced
            else None
        )
        # The recovery is current while this node restarts (log lines carry its trace id).
        with active(recovery):
            sources = {source for _, source, _ in msg.fetch}
            gate = ctx.restore_gate
            gate.close(rank for rank, _, _ in msg.fetch)
            try:
                if sources - {Source.PEER.value}:  # from disk: maybe slower than a worker's
                    await self._fetch_all(msg, recovery)  # restore waits (its client timeout)
                    await self._start_workers(msg, nursery)
                else:  # from peers' RAM while the workers start: their restores wait (gate)
                    async with trio.open_nursery() as fetching:
                        if msg.fetch:
                            fetching.start_soon(self._fetch_all, msg, recovery)
                        await self._start_workers(msg, nursery)
            finally:
                gate.open()
            if msg.step != FRESH:
                await self._wait_local(lambda: len(self._restore_asked) >= len(ranks))
                started_ns = min(self._restore_asked.values())
                with maybe_phase(recovery, Phase.RESTORE, start_time_ns=started_ns) as ph:
                    await self._wait_local(lambda: len(self._restored) >= len(ranks))
                    nbytes = sum(self._restored_bytes(r) for r in ranks)
                    local_source = Source.LOCAL.value if not sources else slowest_source(sources)
                    if ph is not None:
                        ph.set(
                            bytes=nbytes,
                            snapshot_version=msg.step,
                            snapshot_step=msg.step,
                            snapshot_source=local_source,
                        )
                self._report(
                    msg.generation, RestartProgress.RESTORED, nbytes=nbytes, source=local_source
                )
                with maybe_phase(recovery, Phase.RESUME, snapshot_step=msg.step):
                    await self._wait_local(lambda: len(self._stepped) >= len(ranks))
            else:
                await self._wait_local(lambda: len(self._stepped) >= len(ranks))
            self._report(msg.generation, RestartProgress.RESUMED)
            # /proc/net/tcp of a busy host is long: read off the event loop
            self.met_at_master = await trio.to_thread.run_sync(tcp_port_met, msg.master_port)
            log.info("training resumed", generation=msg.generation, step=msg.step)

    async def _start_workers(self, msg: m.Restart, nursery: trio.Nursery) -> None:
        """Start this generation's workers (a warm spare each where one waits) in ``nursery``."""
        ctx = self._ctx
        config = ctx.config
        ranks = list(config.ranks)
        for rank in ranks:
            ctx.arenas.set_restore_target(rank, msg.step)  # FRESH: nothing to restore
        # each worker's credential at this agent: the previous generation's stop working
        tokens = {rank: ctx.tokens.issue(rank, msg.generation) for rank in ranks}
        launch = Launch(
            command=config.command,
            node_rank=config.rank,
            nproc=config.nproc_per_node,
            n_nodes=config.n_nodes,
            generation=msg.generation,
            master_addr=ctx.master_addr,
            master_port=msg.master_port,
            agent=ctx.agent_endpoint,
            env={**config.env, JOB_ENV: config.job_id, **self._master_wait_env(config.env)},
            cwd=config.cwd,
            tokens=tokens,
        )
        group = WorkerGroup(
            launch,
            on_exit=self._on_exit,
            shutdown=config.worker_shutdown,
            spares=self._spares,
        )
        self.workers = group
        with untraced():  # the workers' output is not part of the recovery
            await nursery.start(group.run)
        for rank, pid in group.pids.items():
            monitor = ctx.monitor()
            if monitor is not None:
                monitor.arm(rank, pid)
        log.info(
            "workers started",
            generation=msg.generation,
            step=msg.step,
            pids=group.pids,
            warm=sorted(group.warm),
            forked=sorted(group.forked),
            master_port=msg.master_port,
        )
        self._report(msg.generation, RestartProgress.STARTED)

    def _master_wait_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """A job seen meeting at MASTER_PORT: its spares wait for rank 0 there as long as it
        takes (a replacement node's rank 0 starts seconds later; torch's own retries would
        then come up to a second late). A wait the user set stays."""
        if not self.met_at_master or MASTER_WAIT_ENV in env or MASTER_WAIT_ENV in os.environ:
            return {}
        return {MASTER_WAIT_ENV: str(MASTER_WAIT_MET)}

    async def _fetch_all(self, msg: m.Restart, recovery: RecoveryTrace | None) -> None:
        """Fetch the shards this node lacks (the fetch phase); each fetched rank's restores are
        let through as soon as its shard is here."""
        nbytes = 0
        sources: set[str] = set()
        with maybe_phase(recovery, Phase.FETCH, snapshot_version=msg.step) as ph:
            for rank, source, holder in sorted(msg.fetch):
                nbytes += await self._fetch(rank, msg.step, source, holder)
                sources.add(source)
                self._ctx.restore_gate.open([rank])
            if ph is not None:
                ph.set(
                    bytes=nbytes,
                    snapshot_source=slowest_source(sources),
                    snapshot_step=msg.step,
                )

    @property
    def spare_pids(self) -> list[int]:
        """The PIDs of the spares waiting for the next restart."""
        return self._spares.pids if self._spares is not None else []

    async def fill_spares(self, nursery: trio.Nursery) -> None:
        """Keep one spare per local worker waiting (off the restart's critical path)."""
        if self._spares is not None:
            with untraced():
                await self._spares.fill(nursery, self._ctx.config.nproc_per_node)

    async def stop_workers(self) -> None:
        """Stop the current generation's workers (if any); returns once they all exited."""
        group = self.workers
        if group is None:
            return
        monitor = self._ctx.monitor()
        if monitor is not None:
            monitor.disarm()
        await group.stop()

    def _restored_bytes(self, rank: int) -> int:
        step = self._restored.get(rank)
        info = None if step is None else self._ctx.arenas.versions_by_step(rank).get(step)
        return 0 if info is None else info.nbytes

    async def _wait_local(self, done: Callable[[], bool]) -> None:
        while not done():
            self._local_changed = trio.Event()
            await self._local_changed.wait()

    async def _fetch(self, rank: int, step: int, source: str, holder: int) -> int:
        if source == Source.PEER:
            replicas = whereis(REPLICAS)
            if replicas is None:
                raise RuntimeError("no replica holder to fetch from")
            meta = await fetch_shard_via(replicas, rank, step)
            log.info("shard fetched from a peer", rank=rank, step=step, holder=holder)
            return meta.nbytes
        if source == Source.DISK:
            nbytes = await trio.to_thread.run_sync(self._ctx.load_from_disk, rank, step)
            log.info("shard loaded from disk", rank=rank, step=step)
            return nbytes
        raise ValueError(f"unknown shard source {source!r}")
