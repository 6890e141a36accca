"""Executor: this node's side of every (re)start, and the coordinator's role when it falls here.

A node's life: *joining* (no workers yet) -> *starting* (a Restart arrived: fetch what is
missing, point every local rank's restore at the chosen version, spawn the workers, watch them
restore and take their first step) -> *running* -> on a failure anywhere, *recovering*
(Prepare: workers stopped, holdings reported) -> *starting* ... until *finished* (every local
worker exited 0) or *gave_up* (the coordinator's GiveUp, exit code 3).

Failures seen here (a worker's exit, the Monitor's hang or NaN, a corrupt shard) are reported
to the coordinator with their evidence; the coordinator decides (see `coordinator`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
import trio

from supervise.agents import messages as m
from supervise.agents.monitor import Detection
from supervise.agents.replica_holder import fetch_shard_via
from supervise.agents.workers import Launch, SparePool, WorkerGroup, free_port
from supervise.cluster import DEFERRED, Incoming
from supervise.cluster.failure_detector import Event, PeerBack, PeerLost
from supervise.runtime import ExitKind, ExitReason
from supervise.snapshot import protocol as p
from supervise.telemetry import Phase, RecoveryTrace, Source, Trigger, untraced

if TYPE_CHECKING:
    from supervise.agents.node import NodeRuntime

log = structlog.get_logger("supervise.agents.executor")

JOINING = "joining"
STARTING = "starting"
RUNNING = "running"
RECOVERING = "recovering"
FINISHED = "finished"
GAVE_UP = "gave_up"

FRESH = -1  # Restart.step for a start from scratch
EXIT_GAVE_UP = 3


def held_entries(rt: NodeRuntime) -> tuple[list[Any], list[Any]]:
    """What this node holds, as Holding entries: (rank, step, generation, nbytes, metrics)."""
    ram = [
        (r, v.step, v.generation, v.nbytes, dict(v.metrics))
        for r in rt.config.ranks
        for v in rt.arenas.versions(r)
    ]
    for rep_rank, reps in rt.store.inventory().items():
        for version, generation in reps:
            rep = rt.store.get(rep_rank, version)
            if rep is None or rep.meta.generation != generation:
                continue
            ram.append(
                (rep_rank, version, generation, rep.meta.nbytes, _metrics_of(rep.meta.manifest))
            )
    disk = [
        (r, v.step, v.generation, v.nbytes, dict(v.metrics))
        for r in rt.config.ranks
        for v in (e.info for e in rt.tier(r).entries())
    ]
    return ram, disk


def _metrics_of(manifest: bytes) -> dict[str, float]:
    from supervise.snapshot.manifest import Manifest

    try:
        return dict(Manifest.from_bytes(manifest).metrics)
    except Exception:
        return {}


class Executor:
    """The node's restarts, worker lifecycle and failure reports."""

    def __init__(self, rt: NodeRuntime) -> None:
        self.rt = rt
        self.rank = rt.config.rank
        self.state = JOINING
        self.generation = rt.generation
        self.workers: WorkerGroup | None = None
        self.spares: SparePool | None = None  # made by run()
        self.finished_nodes: set[int] = set()
        self.rewinds: list[tuple[int, int]] = []
        self._nursery: trio.Nursery | None = None
        self._restart_scope: trio.CancelScope | None = None
        # (generation, node running its restart); node -1 once that node's process is gone
        self._leader: tuple[int, int] = (-1, -1)
        self._reported: set[int] = set()
        self._done_ranks: set[int] = set()
        self._done = trio.Event()
        self._local_changed = trio.Event()
        self._restore_asked: dict[int, int] = {}  # rank -> time_ns of its restore request
        self._restored: dict[int, int] = {}  # rank -> step restored
        self._stepped: set[int] = set()
        self.coordinator: Any = None  # set by the node: supervise.agents.coordinator.Coordinator

    # -- queries ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What this node tells its peers in every heartbeat."""
        return {m.INFO_GENERATION: self.generation, m.INFO_STATE: self.state}

    def coordinator_rank(self) -> int:
        """The lowest live rank that is not joining; the lowest live rank when all are.

        The node that led this node's current generation counts as established even while
        its last heartbeat still says joining (right after a start it has not beaten since),
        so a failure in the first moments of a generation goes to the node that started it.
        """
        live = [r for r in self.rt.membership.live() if r not in self.finished_nodes]
        if not live:
            return self.rank
        gen, leader = self._leader
        led = leader if gen == self.generation else None
        established = [r for r in live if r == led or self._state_of(r) not in (JOINING, None)]
        return min(established) if established else min(live)

    def _state_of(self, rank: int) -> str | None:
        if rank == self.rank:
            return self.state
        info = self.rt.membership.peer_info(rank)
        return None if info is None else str(info.get(m.INFO_STATE))

    def known_generation(self) -> int:
        """The highest generation this node has heard of (its own, its peers')."""
        gens = [self.generation]
        for r in self.rt.membership.live():
            info = self.rt.membership.peer_info(r) if r != self.rank else None
            if info is not None and isinstance(info.get(m.INFO_GENERATION), int):
                gens.append(int(info[m.INFO_GENERATION]))
        return max(gens)

    def status(self) -> m.Status:
        ram, disk = held_entries(self.rt)
        live = self.rt.membership.live()
        steps = sorted(self.rt.monitor.last_steps().items()) if self.rt.monitor else []
        return m.Status(
            node=self.rank,
            state=self.state,
            generation=self.generation,
            coordinator=self.coordinator_rank(),
            live=list(live),
            ranks=list(self.rt.config.ranks),
            ram=ram,
            disk=disk,
            steps=steps,
        )

    # -- running ---------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Executor] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve restarts until this node finished or gave up; then return normally."""
        transport = self.rt.transport
        assert transport is not None
        routes: list[tuple[type[Any], Callable[[Incoming[Any]], Any]]] = [
            (m.Prepare, self._on_prepare),
            (m.Restart, self._on_restart),
            (m.GiveUp, self._on_give_up),
            (m.Finished, self._on_finished),
            (m.StatusQuery, self._on_status),
            (m.Recover, self._on_recover),
            (m.Failure, self._on_failure),
            (m.Progress, self._on_progress),
        ]
        for kind, handler in routes:
            transport.handle(kind, handler)
        self.rt.arenas_hooks(self)
        rt = self.rt
        self.spares = SparePool(
            rt.config.command,
            rt.policy.recovery.preload,
            rt.run_dir,
            env=rt.config.env,
            cwd=rt.config.cwd,
            on_output=rt.on_worker_output,
            shutdown=rt.config.worker_shutdown,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                events = self.rt.membership.subscribe()
                nursery.start_soon(self._membership_events, events)
                if self.coordinator is not None:
                    await nursery.start(self.coordinator.run)
                nursery.start_soon(self._fill_spares)
                task_status.started(self)
                await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            for kind, handler in routes:
                transport.unhandle(kind, handler)
            with trio.CancelScope(shield=True):
                await self._stop_workers()

    async def _membership_events(self, events: trio.MemoryReceiveChannel[Event]) -> None:
        async for ev in events:
            if (
                isinstance(ev, PeerLost | PeerBack)
                and ev.rank == self._leader[1]
                and (isinstance(ev, PeerLost) or ev.restarted)
            ):
                # The process that led this generation is gone (a replacement leads nothing
                # before it joins): coordination and progress go by membership again.
                self._leader = (self._leader[0], -1)
            if self.coordinator is not None:
                self.coordinator.membership_event(ev)
            if isinstance(ev, PeerLost | PeerBack):
                log.info("membership changed", change=ev.kind, peer=ev.rank)

    # -- local detections ------------------------------------------------------------------

    def detected(self, d: Detection) -> None:
        """A failure seen on this node (Monitor, worker exit, corrupt shard): tell the
        coordinator once per generation."""
        if self.state not in (RUNNING, STARTING) or self.generation in self._reported:
            log.debug("detection ignored", trigger=d.trigger.value, state=self.state)
            return
        self._reported.add(self.generation)
        evidence = dict(d.evidence)
        if d.stop:
            evidence["stop"] = True
        failure = m.Failure(
            self.rank, self.generation, d.trigger.value, d.since, d.detected, evidence
        )
        self.send_to_coordinator(failure)

    def send_to_coordinator(self, message: object, trace: Mapping[str, str] | None = None) -> None:
        """Deliver ``message`` to the coordinator (this node included), in the background."""
        target = self.coordinator_rank()
        if target == self.rank:
            if self.coordinator is not None:
                self.coordinator.receive(message, dict(trace or {}))
            return
        if self._nursery is None:
            return
        self._nursery.start_soon(self._send, target, message, trace)

    async def _send(self, peer: int, message: object, trace: Mapping[str, str] | None) -> None:
        transport = self.rt.transport
        assert transport is not None
        try:
            await transport.send(peer, message, trace=trace, timeout=5.0)
        except Exception as exc:
            log.warning("message to the coordinator lost", peer=peer, error=str(exc))

    def _worker_exited(self, rank: int, pid: int, reason: ExitReason) -> None:
        if self.rt.monitor is not None:
            self.rt.monitor.disarm(rank)
        group = self.workers
        if group is None or group.stopping:
            return
        if reason.kind is ExitKind.NORMAL:
            self._done_ranks.add(rank)
            log.info("worker finished", rank=rank, pid=pid)
            if self._done_ranks >= set(self.rt.config.ranks):
                self._node_finished()
            return
        now = time.time()
        evidence = {
            "rank": rank,
            "pid": pid,
            "exit_code": reason.exit_code,
            "signal": reason.signal,
            "reason": str(reason),
        }
        self.detected(Detection(Trigger.WORKER_EXIT, now, now, evidence))

    def corrupt(self, rank: int, step: int, reason: str) -> None:
        """The arena service's corrupt hook: a worker found a shard that fails its checksum."""
        now = time.time()
        evidence = {"rank": rank, "version": step, "reason": reason}
        self.detected(Detection(Trigger.CHECKSUM, now, now, evidence))

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

    def _node_finished(self) -> None:
        log.info("training finished on this node", node=self.rank, generation=self.generation)
        self.state = FINISHED
        transport = self.rt.transport
        if transport is not None:
            for peer in self.rt.membership.peers:
                with contextlib.suppress(Exception):
                    transport.try_send(peer, m.Finished(self.rank, self.generation))
        self.rt.exit_code = 0
        self._done.set()

    # -- coordinator -> node ---------------------------------------------------------------

    async def _on_prepare(self, msg: Incoming[m.Prepare]) -> object:
        gen = msg.body.generation
        if gen < self.generation:
            raise ValueError(f"prepare for generation {gen}, this node is at {self.generation}")
        assert self._nursery is not None
        self._nursery.start_soon(self._prepare, msg)
        return DEFERRED

    async def prepare(self, generation: int) -> m.Holding:
        """Stop the workers for a restart at ``generation``; say what this node holds."""
        if self._restart_scope is not None:
            self._restart_scope.cancel()
        self.generation = max(self.generation, generation)
        if self.state not in (FINISHED, GAVE_UP):
            self.state = RECOVERING if self.state != JOINING else JOINING
        await self._stop_workers()
        ram, disk = held_entries(self.rt)
        port = free_port(self.rt.config.master_addr) if self.rt.config.hosts_rank_zero else 0
        return m.Holding(self.rank, ram, disk, port)

    async def _prepare(self, msg: Incoming[m.Prepare]) -> None:
        with _joined(msg.trace, self.rank):  # stopping the workers is part of the recovery
            holding = await self.prepare(msg.body.generation)
        transport = self.rt.transport
        assert transport is not None
        await transport.reply(msg, holding)

    async def _on_restart(self, msg: Incoming[m.Restart]) -> object:
        self.accept_restart(msg.body, msg.trace, leader=msg.sender)
        return m.Progress(self.rank, msg.body.generation, "accepted")

    def accept_restart(
        self, restart: m.Restart, trace: Mapping[str, str], *, leader: int | None = None
    ) -> None:
        """Begin a restart in the background (the coordinator's own node calls this too).
        Its progress goes to ``leader``, the node running that attempt (default: this one)."""
        if restart.generation < self.generation:
            raise ValueError(
                f"restart at generation {restart.generation}, this node is at {self.generation}"
            )
        self._leader = (restart.generation, self.rank if leader is None else leader)
        if self._restart_scope is not None:
            self._restart_scope.cancel()
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._restart_scope = scope
        self._nursery.start_soon(self._restart, restart, dict(trace), scope)

    async def _restart(
        self, msg: m.Restart, trace: dict[str, str], scope: trio.CancelScope
    ) -> None:
        with scope:
            try:
                await self._do_restart(msg, trace)
            except Exception as exc:
                log.exception("restart failed", generation=msg.generation)
                self._progress(msg.generation, "failed", detail=f"{type(exc).__name__}: {exc}")

    async def _do_restart(self, msg: m.Restart, trace: dict[str, str]) -> None:
        rt = self.rt
        self.generation = msg.generation
        self.state = STARTING
        self.rewinds = list(msg.rewinds)
        self._restore_asked.clear()
        self._restored.clear()
        self._stepped.clear()
        self._done_ranks.clear()
        ranks = list(rt.config.ranks)
        traced = msg.trigger != "start" and bool(trace)
        recovery = (
            RecoveryTrace.join(trace, rank=self.rank, attempt=msg.attempt, trigger=msg.trigger)
            if traced
            else None
        )
        # The recovery is current while this node restarts (log lines carry its trace id).
        with _active(recovery):
            sources: set[str] = set()
            if msg.fetch:
                nbytes = 0
                with _phase(recovery, Phase.FETCH, snapshot_version=msg.step) as ph:
                    for rank, source, holder in sorted(msg.fetch):
                        nbytes += await self._fetch(rank, msg.step, source, holder)
                        sources.add(source)
                    if ph is not None:
                        ph.set(
                            bytes=nbytes,
                            snapshot_source=_one_source(sources),
                            snapshot_step=msg.step,
                        )
            for rank in ranks:
                rt.arenas.set_restore_target(rank, msg.step)  # FRESH (-1): nothing to restore
            launch = Launch(
                command=rt.config.command,
                node_rank=self.rank,
                nproc=rt.config.nproc_per_node,
                n_nodes=rt.config.n_nodes,
                generation=msg.generation,
                master_addr=rt.config.master_addr,
                master_port=msg.master_port,
                agent=rt.agent_endpoint,
                env=rt.config.env,
                cwd=rt.config.cwd,
            )
            group = WorkerGroup(
                launch,
                on_exit=self._worker_exited,
                on_output=rt.on_worker_output,
                shutdown=rt.config.worker_shutdown,
                spares=self.spares,
            )
            assert self._nursery is not None
            self.workers = group
            with untraced():  # the workers' output is not part of the recovery
                await self._nursery.start(group.run)
            for rank, pid in group.pids.items():
                if rt.monitor is not None:
                    rt.monitor.arm(rank, pid)
            log.info(
                "workers started",
                generation=msg.generation,
                step=msg.step,
                pids=group.pids,
                warm=sorted(group.warm),
                master_port=msg.master_port,
            )
            self._progress(msg.generation, "started")
            if msg.step != FRESH:
                await self._wait_local(lambda: len(self._restore_asked) >= len(ranks))
                started_ns = min(self._restore_asked.values())
                with _phase(recovery, Phase.RESTORE, start_time_ns=started_ns) as ph:
                    await self._wait_local(lambda: len(self._restored) >= len(ranks))
                    nbytes = sum(self._restored_bytes(r) for r in ranks)
                    local_source = Source.LOCAL.value if not sources else _one_source(sources)
                    if ph is not None:
                        ph.set(
                            bytes=nbytes,
                            snapshot_version=msg.step,
                            snapshot_step=msg.step,
                            snapshot_source=local_source,
                        )
                self._progress(msg.generation, "restored", nbytes=nbytes, source=local_source)
                with _phase(recovery, Phase.RESUME, snapshot_step=msg.step):
                    await self._wait_local(lambda: len(self._stepped) >= len(ranks))
            else:
                await self._wait_local(lambda: len(self._stepped) >= len(ranks))
            self.state = RUNNING
            self._progress(msg.generation, "resumed")
            log.info("training resumed", generation=msg.generation, step=msg.step)
        if self._nursery is not None:
            self._nursery.start_soon(self._fill_spares)  # for the next restart

    async def _fill_spares(self) -> None:
        """Keep one spare per local worker waiting (off the restart's critical path)."""
        if (
            self._nursery is not None
            and self.spares is not None
            and self.state not in (FINISHED, GAVE_UP)
        ):
            with untraced():
                await self.spares.fill(self._nursery, self.rt.config.nproc_per_node)

    def _restored_bytes(self, rank: int) -> int:
        step = self._restored.get(rank)
        for v in self.rt.arenas.versions(rank):
            if v.step == step:
                return v.nbytes
        return 0

    async def _wait_local(self, done: Callable[[], bool]) -> None:
        while not done():
            self._local_changed = trio.Event()
            await self._local_changed.wait()

    async def _fetch(self, rank: int, step: int, source: str, holder: int) -> int:
        if source == Source.PEER.value:
            if self.rt.replicas is None:
                raise RuntimeError("no replica holder to fetch from")
            meta = await fetch_shard_via(self.rt.replicas, rank, step)
            log.info("shard fetched from a peer", rank=rank, step=step, holder=holder)
            return meta.nbytes
        if source == Source.DISK.value:
            nbytes = await trio.to_thread.run_sync(self.rt.load_from_disk, rank, step)
            log.info("shard loaded from disk", rank=rank, step=step)
            return nbytes
        raise ValueError(f"unknown shard source {source!r}")

    def _progress(
        self, generation: int, phase: str, *, detail: str = "", nbytes: int = 0, source: str = ""
    ) -> None:
        progress = m.Progress(self.rank, generation, phase, detail, nbytes, source)
        gen, leader = self._leader
        if gen != generation or leader < 0:
            self.send_to_coordinator(progress)
        elif leader == self.rank:
            if self.coordinator is not None:
                self.coordinator.receive(progress, {})
        elif self._nursery is not None:
            self._nursery.start_soon(self._send, leader, progress, None)  # the node awaiting it

    async def _on_give_up(self, msg: Incoming[m.GiveUp]) -> None:
        self.give_up(msg.body.reason, msg.body.exit_code)

    def give_up(self, reason: str, exit_code: int) -> None:
        """Stop for good (the coordinator decided): workers stopped, the node exits."""
        log.error("giving up", reason=reason, exit_code=exit_code)
        self.state = GAVE_UP
        self.rt.exit_code = exit_code
        self.rt.exit_reason = reason
        if self._restart_scope is not None:
            self._restart_scope.cancel()
        self._done.set()

    async def _on_finished(self, msg: Incoming[m.Finished]) -> None:
        self.finished_nodes.add(msg.body.node)

    async def _on_status(self, msg: Incoming[m.StatusQuery]) -> object:
        return self.status()

    async def _on_recover(self, msg: Incoming[m.Recover]) -> object:
        target = self.coordinator_rank()
        if target != self.rank:
            transport = self.rt.transport
            reply = await transport.request(
                target, msg.body, trace=msg.trace, timeout=30.0, expect=m.RecoverReply
            )
            return reply.body
        if self.coordinator is None:
            return m.RecoverReply(False, f"node {self.rank} runs no coordinator")
        try:
            detail = await self.coordinator.manual(msg.body.version, dict(msg.trace))
        except ValueError as exc:
            log.warning("manual recovery refused", reason=str(exc))
            return m.RecoverReply(False, str(exc))
        return m.RecoverReply(True, detail)

    async def _on_failure(self, msg: Incoming[m.Failure]) -> None:
        if self.coordinator is not None:
            self.coordinator.receive(msg.body, dict(msg.trace))

    async def _on_progress(self, msg: Incoming[m.Progress]) -> None:
        if self.coordinator is not None:
            self.coordinator.receive(msg.body, dict(msg.trace))

    async def _stop_workers(self) -> None:
        group = self.workers
        if group is None:
            return
        if self.rt.monitor is not None:
            self.rt.monitor.disarm()
        await group.stop()


def _one_source(sources: set[str]) -> str:
    """The snapshot source attribute for several shards: the slowest tier involved."""
    for tier in (Source.DISK.value, Source.PEER.value):
        if tier in sources:
            return tier
    return Source.LOCAL.value


def _active(recovery: RecoveryTrace | None) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if recovery is None else recovery.activate()


def _joined(trace: Mapping[str, str], rank: int) -> contextlib.AbstractContextManager[None]:
    """The recovery named by a message's trace context is current (none: no change)."""
    if not trace:
        return contextlib.nullcontext()
    return RecoveryTrace.join(trace, rank=rank).activate()


@contextlib.contextmanager
def _phase(recovery: RecoveryTrace | None, phase: Phase, **kwargs: Any) -> Any:
    if recovery is None:
        yield None
        return
    with recovery.phase(phase, **kwargs) as ph:
        yield ph
