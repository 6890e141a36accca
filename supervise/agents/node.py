"""The node agent: one OS process per node running the node's supervision tree.

``rest_for_one``, in order: transport (zmq to the peers), membership (heartbeats, failure
detector), local (the workers' snapshot endpoint, ``SUPERVISE_AGENT``), replicas
(`ReplicaHolder`), monitor, executor (which owns the training workers). The snapshot arenas,
the replica store and the persist tiers belong to the node itself (`NodeRuntime`), not to a
child, so a child's crash and restart loses no committed snapshot.

The executor and the coordinator get a `NodeContext` (the parts they use), not the runtime.

Exit codes of `run_node`: 0 training finished, 1 (`EXIT_INTERNAL`) the node's own tree gave
up, 3 (`EXIT_GAVE_UP`) recovery gave up (exhausted, or the policy said stop), 128 + N stopped
by signal N.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from supervise.agents._capture_spans import CaptureSpans
from supervise.agents._shards import ArenaShards
from supervise.agents.config import NodeConfig
from supervise.agents.context import NodeContext
from supervise.agents.coordinator import Coordinator
from supervise.agents.executor import Executor
from supervise.agents.farm_node import FarmNode, Link, agent_farm_node
from supervise.agents.farm_store import FarmStoreTable
from supervise.agents.keeper import PointKeeper
from supervise.agents.lifecycle import EXIT_INTERNAL, ExecutorState
from supervise.agents.messages import ALL_KINDS, INFO_STATE
from supervise.agents.monitor import Detection, Monitor
from supervise.agents.preflight import StartupError
from supervise.agents.replica_holder import REPLICAS, LocalCommit, ReplicaHolder
from supervise.agents.rundir import NodeLock, claim_run_dir, dead_nodes_arenas
from supervise.agents.seat import StoreSeat
from supervise.agents.workers import SparePool
from supervise.cluster import CurveKeys, Transport, TransportLimits
from supervise.cluster.failure_detector import DetectorConfig, LossCause
from supervise.cluster.ipc import ipc_endpoint, serve_requests
from supervise.cluster.membership import Membership
from supervise.cluster.probe import refuses
from supervise.cluster.recovery_point import PINNED_VERSIONS
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.transport import normalize_endpoint
from supervise.runtime import ChildSpec, GaveUp, StartFailed, Supervisor, child, whereis
from supervise.snapshot import protocol as p
from supervise.snapshot.budget import MemoryBudget, total_ram
from supervise.snapshot.persist import Persister, PersistTier, check_resumable
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService, CommitEvent
from supervise.snapshot.tokens import RankTokens
from supervise.tasks.control import FarmControl
from supervise.tasks.farm_link import FarmLink
from supervise.telemetry import Source, get_telemetry

__all__ = ["NodeConfig", "NodeRuntime", "run_node"]

log = structlog.get_logger("supervise.agents.node")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop the agent in order (workers stopped, arenas and run dir removed); SIGHUP
only when it is not ignored (``nohup supervise node ...`` keeps running after a hang-up)."""


def _stop_signals() -> list[signal.Signals]:
    return [
        s
        for s in STOP_SIGNALS
        if s is not signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN
    ]


def transport_limits(peer_timeout: float) -> TransportLimits:
    """The agent's transport limits: a rank's connection silent for ``peer_timeout`` (the
    node is declared lost by then) no longer holds its rank, so a replacement for a node whose
    link never closed (its host crashed) is heard as soon as it is due, never later."""
    default = TransportLimits()
    return attrs.evolve(default, rebind_after=min(default.rebind_after, peer_timeout))


class NodeRuntime:
    """What a node owns across its children's restarts, and the references between them."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        curve: CurveKeys | None = None,
        spares: SparePool | None = None,
    ) -> None:
        self.config = config
        self.spares = spares  # warm spares started before the node (a standby's), if any
        self.policy = config.policy
        self.exit_code: int | None = None  # how the executor ended (None: it did not)
        self.generation = 0
        # Hooks may fire off the trio thread (a shard loaded from disk commits on the loader's
        # thread); what needs the trio run (the registry) is handed over with this token.
        self._token: trio.lowlevel.TrioToken | None = None
        with contextlib.suppress(RuntimeError):
            self._token = trio.lowlevel.current_trio_token()
        persist = self.policy.persist
        self._tiers = {
            rank: PersistTier(persist.path, rank=rank, keep=persist.keep, job=config.job_id)
            for rank in config.ranks
        }
        # Before anything is allocated: a finished job is not resumed unless asked.
        check_resumable(
            self._tiers.values(),
            resume_finished=config.resume_finished,
            hint="pass --resume-finished to resume it, or --job NAME to start another job",
        )
        self._own_tmp = config.run_dir is None
        self._tmp = Path(config.run_dir) if config.run_dir else claim_run_dir(config.rank)
        node = f"node{config.rank}-{_port_of(config.endpoint)}"
        self._lock: NodeLock | None = None
        try:
            self._lock = NodeLock(config.shm_dir, node)  # before adopting the node's arenas
            _warn_dead_nodes(config.shm_dir, node)
            self._build(config, curve, node)
        except BaseException:
            self._release()
            raise

    def _build(self, config: NodeConfig, curve: CurveKeys | None, node: str) -> None:
        r = self.policy.retention
        rule = RetentionRule(r.keep_last, r.keep_best, r.best_metric, r.best_mode)
        ram = total_ram()
        budget = r.memory_budget.resolve(ram)
        tokens = RankTokens()  # the endpoint serves a worker for its own rank only
        self.arenas = ArenaService(
            config.shm_dir,
            rule=rule,
            budget=MemoryBudget(budget),
            node=node,
            policy=self.policy.to_dict(),
            # the recoverable point, its target, and (with peers to push to) a version a push
            # still reads after retention let it go: a push runs to its end
            pinned_slots=PINNED_VERSIONS + (1 if _has_peers(config) else 0),
            tokens=tokens,
        )
        # One budget for this node's arenas and its peers' replicas: the store reserves its
        # buffers there too, and an arena that does not fit reclaims older replicas first.
        self.store = ReplicaStore(budget, keep_last=r.keep_last, shared=self.arenas.budget)
        for tier in self._tiers.values():
            tier.clean_temporaries()
        self.persister: Persister | None = None
        if self.policy.persist.every_snapshots:
            self.persister = Persister(
                self.arenas,
                self._tiers.__getitem__,  # each local rank's tier
                every=self.policy.persist.every_snapshots,
                node_rank=config.rank,
            )
            self.arenas.add_commit_hook(self.persister.on_commit)
        if curve is None:
            log.info(
                "peer links are not authenticated: loopback only (replication.curve = false); "
                "every process on this host can reach them",
                endpoint=config.endpoint,
            )
        self.transport = Transport(
            rank=config.rank,
            endpoint=config.endpoint,
            peers={i: ep for i, ep in enumerate(config.nodes) if i != config.rank},
            curve=curve,
            kinds=ALL_KINDS,
            nodes=config.n_nodes,
            limits=transport_limits(config.policy.cluster.peer_timeout),
        )
        self.membership = Membership(
            self.transport,
            [i for i in range(config.n_nodes) if i != config.rank],
            DetectorConfig(
                interval=self.policy.cluster.heartbeat_interval,
                timeout=self.policy.cluster.peer_timeout,
            ),
            info=self._info,
            probe=self._refuses,
            advertise=config.endpoint,
            on_endpoint=self._peer_serves_at,
        )
        self.transport.on_rank_closed(self.membership.link_closed)
        self.keeper = PointKeeper(
            config,
            self.arenas,
            self.store,
            lambda: self.membership,
            lambda: ExecutorState.JOINING if self.executor is None else self.executor.state,
        )
        self.monitor: Monitor | None = None
        self.executor: Executor | None = None
        self.seat = StoreSeat(config) if config.coordinated_by_store else None
        if self.seat is not None:  # membership = live leases: a lease's end is a node lost
            self.seat.on_member_lost = functools.partial(
                self.membership.lose, cause=LossCause.LEASE
            )
        self.farm_node: FarmNode | None = None  # with --tasks: `farm_node_child`
        self._farm_control: FarmControl | None = None  # with --tasks: `farm_control`
        self._farm_link: FarmLink | None = None
        self.context = NodeContext(
            config=config,
            transport=self.transport,
            membership=self.membership,
            arenas=self.arenas,
            store=self.store,
            tiers=self._tiers,
            run_dir=self._tmp,
            agent_endpoint=ipc_endpoint(self._tmp, "agent"),
            tokens=tokens,
            monitor=lambda: self.monitor,
            keeper=self.keeper,
            seat=self.seat,
        )
        self.arenas.add_heartbeat_hook(self._heartbeat)
        self.arenas.add_pause_hook(self._pause)
        self.arenas.add_corrupt_hook(self._corrupt)
        self.arenas.add_request_hook(self._request)
        self.arenas.add_commit_hook(self._committed)
        captures = CaptureSpans(config.rank)
        self.arenas.add_request_hook(captures.on_request)
        self.arenas.add_commit_hook(captures.on_commit)
        tel = get_telemetry()
        self._unregister = [
            tel.register_memory_source(
                "arena", lambda: max(0, self.arenas.budget.held - self.store.held_bytes)
            ),
            tel.register_memory_source("replica", lambda: self.store.held_bytes),
            tel.register_lag_source(self.keeper.lag),
        ]

    # -- hooks routed to whichever child incarnation is current ---------------------------

    def _heartbeat(self, rank: int, step: int, metrics: Mapping[str, float]) -> None:
        if self.monitor is not None:
            self.monitor.heartbeat(rank, step, metrics)

    def _pause(self, rank: int, paused: bool) -> None:
        if self.monitor is not None:
            self.monitor.pause(rank, paused)

    def _corrupt(self, rank: int, step: int, reason: str) -> None:
        if self.executor is not None:
            self.executor.corrupt(rank, step, reason)

    def _request(self, req: p.Request) -> None:
        if self.executor is not None:
            self.executor.local_request(req)

    def _committed(self, event: CommitEvent) -> None:
        if event.info.source != Source.LOCAL:
            return  # a shard from a peer or from disk is not pushed again
        self._on_trio(self._push, event.rank)

    def _push(self, rank: int) -> None:
        ref = whereis(REPLICAS)
        if ref is not None:
            ref.cast(LocalCommit(rank))

    def _on_trio(self, fn: Callable[[int], None], arg: int) -> None:
        """Run ``fn(arg)`` on the trio thread: at once when called there, else handed over
        (it runs soon after; never waited for, so a hook on another thread cannot block)."""
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            if self._token is None:
                log.warning("hook called off the trio thread, with no trio run to hand it to")
                return
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(_logged, fn, arg)
            return
        fn(arg)

    def _peer_serves_at(self, rank: int, endpoint: str) -> None:
        """Node ``rank`` says it listens at ``endpoint`` (a standby that took the rank over,
        or a replacement back at the rank's own address): send to it there from now on."""
        try:
            moved = normalize_endpoint(endpoint) != self.transport.peers.get(rank)
        except ValueError:
            log.warning("a peer advertised an unusable endpoint", node=rank, endpoint=endpoint)
            return
        if moved:
            self.transport.set_peer(rank, endpoint)
            log.info("peer serves at a new endpoint", node=rank, endpoint=endpoint)

    async def _refuses(self, rank: int) -> bool:
        """Whether peer ``rank``'s endpoint refuses connections now (its agent is gone)."""
        endpoint = self.transport.peers.get(rank)
        timeout = self.policy.cluster.peer_timeout / 2
        return endpoint is not None and await refuses(endpoint, timeout)

    def _info(self) -> Mapping[str, Any]:
        point = self.keeper.tick(trio.current_time())
        if self.executor is None:
            return {INFO_STATE: ExecutorState.JOINING.value, **point}
        return {**self.executor.info(), **point}

    # -- the tree's children ---------------------------------------------------------------

    async def serve_transport(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.transport.serve)
            task_status.started()

    async def serve_membership(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.membership.run)
            task_status.started()

    async def serve_local(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    serve_requests,
                    self.context.agent_endpoint,
                    self.arenas.handle,
                    hold=self.context.restore_gate.hold,
                )
            )
            task_status.started()

    async def serve_monitor(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        monitor = Monitor(self.policy, self._detected, peers_quiet_for=self.membership.quiet_for)
        self.monitor = monitor
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(monitor.run)
                task_status.started()
        finally:
            self.monitor = None

    def _detected(self, d: Detection) -> None:
        if self.executor is not None:
            self.executor.detected(d)

    async def serve_executor(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        executor = Executor(self.context, generation=self.generation)
        executor.coordinator = Coordinator(self.context, executor)
        executor.spares = self.spares
        self.executor = executor
        try:
            ended = await executor.run(task_status=task_status)
            self.exit_code = ended.exit_code
        finally:
            self.generation = executor.generation
            self.executor = None

    def farm_node_child(
        self,
        link: Link,
        *,
        coordinator: Callable[[], int | None],
        capacity: Mapping[str, Any],
        labels: Sequence[str] = (),
    ) -> ChildSpec:
        """The farm node side (``--tasks``): tasks assigned to this node run in workers, their
        journals in this node's arenas (see `supervise.agents.farm_node`). ``link``: the
        agent's `FarmLink`, shared with its `FarmControl`. Built once per runtime."""
        if self.farm_node is None:
            self.farm_node = agent_farm_node(
                self.context, link, coordinator=coordinator, capacity=capacity, labels=labels
            )
        return child(self.farm_node.run, id="farm_node")

    def farm_control(self) -> FarmControl:
        """The farm's control plane on this node (``--tasks``): coordinator when it is the
        lowest live rank (or the elected leader with ``--store``), else a table replica.
        Built once per runtime, so a restart of its child keeps the table."""
        if self._farm_control is None:
            seat = self.seat
            leader = (lambda: self.membership.root) if seat is None else seat.leader_rank
            self._farm_link = FarmLink(self.transport)
            self._farm_control = FarmControl(
                self._farm_link,
                leader=leader,
                live=self.membership.live,
                lease_s=self.policy.cluster.peer_timeout,
                durable=None if seat is None else FarmStoreTable(seat),
                changes=self.membership.subscribe,
            )
        return self._farm_control

    def farm_children(self) -> list[ChildSpec]:
        """The farm node's children (``--tasks``): the control plane, then the node side."""
        farm = self.config.farm
        assert farm is not None
        control = self.farm_control()
        assert self._farm_link is not None
        return [
            child(control.run, id="farm_control"),
            self.farm_node_child(
                self._farm_link,
                coordinator=control.coordinator,
                capacity=farm.capacity.to_json(),
                labels=sorted(farm.labels),
            ),
        ]

    def tree(self) -> Supervisor:
        """The node's supervision tree."""
        s = self.policy.supervision
        if self.config.farm is not None:  # a farm node: tasks instead of training workers
            return Supervisor(
                [
                    child(self.serve_transport, id="transport"),
                    child(self.serve_membership, id="membership"),
                    child(self.serve_local, id="local"),
                    *([] if self.seat is None else [child(self.seat.run, id="seat")]),
                    *self.farm_children(),
                ],
                strategy="rest_for_one",
                max_restarts=s.max_restarts,
                max_seconds=s.max_seconds,
            )
        return Supervisor(
            [
                child(self.serve_transport, id="transport"),
                child(self.serve_membership, id="membership"),
                child(self.serve_local, id="local"),
                child(
                    ReplicaHolder,
                    self.transport,
                    self.policy,
                    ArenaShards(self.arenas, self.config.ranks),
                    id=REPLICAS,
                    name=REPLICAS,
                    node=self.config.rank,
                    n_nodes=self.config.n_nodes,
                    ranks_per_node=self.config.nproc_per_node,
                    membership=self.membership,
                    store=self.store,
                    attach=self.keeper.apply,
                ),
                child(self.serve_monitor, id="monitor"),
                child(
                    self.serve_executor,
                    id="executor",
                    restart="transient",
                    significant=True,
                    shutdown=self.config.worker_shutdown + 10.0,
                ),
                # last: a lost lease restarts the seat alone, never the workers
                *([] if self.seat is None else [child(self.seat.run, id="seat")]),
            ],
            strategy="rest_for_one",
            max_restarts=s.max_restarts,
            max_seconds=s.max_seconds,
            auto_shutdown="any_significant",
        )

    def close(self, *, keep_arenas: bool = False) -> None:
        """Release what the node owns: persist queue drained, arenas unmapped and removed
        (``keep_arenas``: left for the next agent of this node to adopt), run dir removed."""
        for unregister in self._unregister:
            unregister()
        if self.persister is not None:
            self.persister.close()
        if self.exit_code == 0:  # every local worker finished: the job is done here
            marked = [str(m) for t in self._tiers.values() if (m := t.mark_finished())]
            if marked:
                log.info("job finished: marked", job=self.config.job_id, markers=marked)
        self.store.close()
        self.arenas.close(unlink=not keep_arenas)
        self._release()

    def _release(self) -> None:
        """The node lock and the run dir (also when building the node failed halfway)."""
        if self._lock is not None:
            self._lock.release()
        if self._own_tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _has_peers(config: NodeConfig) -> bool:
    """Whether this node pushes its shards to group peers."""
    return config.n_nodes > 1 and config.policy.replication.replicas > 1


def _warn_dead_nodes(shm_dir: str, own: str) -> None:
    """Say which dead agents' arenas sit in ``shm_dir`` (RAM nobody frees unless that node's
    agent is started again with the same rank, port and dir); they are not ours to remove."""
    for node, arenas in dead_nodes_arenas(shm_dir, own).items():
        log.warning(
            "arenas of a dead agent in the shm dir: its next start adopts them; remove them "
            "if it will not be started again",
            node=node,
            files=[str(a) for a in arenas],
            bytes=sum(a.stat().st_size for a in arenas if a.exists()),
        )


def _logged(fn: Callable[[int], None], arg: int) -> None:
    """``fn(arg)`` with any exception logged (a callback handed to trio must not raise)."""
    try:
        fn(arg)
    except Exception:
        log.exception("node hook failed", hook=getattr(fn, "__name__", repr(fn)))


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (a bind that failed...) among an exception's causes and groups (not its
    context: an error handled on the way is not why it failed)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return None


def _port_of(endpoint: str) -> str:
    return normalize_endpoint(endpoint).rpartition(":")[2]


async def run_node(
    config: NodeConfig, *, curve: CurveKeys | None = None, spares: SparePool | None = None
) -> int:
    """Run one node agent until training finished, recovery gave up, or a signal; returns
    the process exit code. ``spares``: warm spare workers already started (a standby's)."""
    rt = NodeRuntime(config, curve=curve, spares=spares)
    stopped_by: int | None = None
    unusable: OSError | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def signals() -> None:
                nonlocal stopped_by
                with trio.open_signal_receiver(*_stop_signals()) as received:
                    async for signum in received:
                        stopped_by = signum
                        log.warning("stopping on signal", signal=signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(signals)
            try:
                await rt.tree().run()
            except StartFailed as exc:
                unusable = _os_error(exc)  # e.g. the port taken since the start-up checks
                if unusable is None:
                    raise
            except GaveUp as exc:
                log.error("the node's supervision tree gave up", error=str(exc))
                rt.exit_code = EXIT_INTERNAL
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(
                functools.partial(rt.close, keep_arenas=unusable is not None)
            )
    if unusable is not None:
        raise StartupError(f"node {config.rank} ({config.endpoint})", unusable.strerror or "")
    if stopped_by is not None:
        return 128 + stopped_by
    if rt.exit_code is None:
        return EXIT_INTERNAL
    return rt.exit_code
