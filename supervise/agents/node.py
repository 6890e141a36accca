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

import shutil
import signal
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import trio

from supervise.agents._capture_spans import CaptureSpans
from supervise.agents._shards import ArenaShards
from supervise.agents.config import NodeConfig
from supervise.agents.context import NodeContext
from supervise.agents.coordinator import Coordinator
from supervise.agents.executor import Executor
from supervise.agents.keeper import PointKeeper
from supervise.agents.lifecycle import EXIT_INTERNAL, ExecutorState
from supervise.agents.messages import ALL_KINDS, INFO_STATE
from supervise.agents.monitor import Detection, Monitor
from supervise.agents.replica_holder import REPLICAS, LocalCommit, ReplicaHolder
from supervise.cluster import CurveKeys, Transport
from supervise.cluster.failure_detector import DetectorConfig
from supervise.cluster.ipc import ipc_endpoint, serve_requests
from supervise.cluster.membership import Membership
from supervise.cluster.recovery_point import PINNED_VERSIONS
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.transport import normalize_endpoint
from supervise.runtime import GaveUp, Supervisor, child, whereis
from supervise.snapshot import protocol as p
from supervise.snapshot.budget import MemoryBudget, total_ram
from supervise.snapshot.persist import Persister, PersistTier
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService, CommitEvent
from supervise.telemetry import Source, get_telemetry

__all__ = ["NodeConfig", "NodeRuntime", "run_node"]

log = structlog.get_logger("supervise.agents.node")


class NodeRuntime:
    """What a node owns across its children's restarts, and the references between them."""

    def __init__(self, config: NodeConfig, *, curve: CurveKeys | None = None) -> None:
        self.config = config
        self.policy = config.policy
        self.exit_code: int | None = None  # how the executor ended (None: it did not)
        self.generation = 0
        self._tmp = Path(config.run_dir or tempfile.mkdtemp(prefix=f"supervise-n{config.rank}-"))
        self._own_tmp = config.run_dir is None
        r = self.policy.retention
        rule = RetentionRule(r.keep_last, r.keep_best, r.best_metric, r.best_mode)
        ram = total_ram()
        budget = r.memory_budget.resolve(ram)
        self.arenas = ArenaService(
            config.shm_dir,
            rule=rule,
            budget=MemoryBudget(budget),
            node=f"node{config.rank}-{_port_of(config.endpoint)}",
            policy=self.policy.to_dict(),
            # the recoverable point, its target, and (with peers to push to) a version a push
            # still reads after retention let it go: a push runs to its end
            pinned_slots=PINNED_VERSIONS + (1 if _has_peers(config) else 0),
        )
        # One budget for this node's arenas and its peers' replicas: the store reserves its
        # buffers there too, and an arena that does not fit reclaims older replicas first.
        self.store = ReplicaStore(budget, keep_last=r.keep_last, shared=self.arenas.budget)
        self._tiers = {
            rank: PersistTier(self.policy.persist.path, rank=rank, keep=self.policy.persist.keep)
            for rank in config.ranks
        }
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
        self.transport = Transport(
            rank=config.rank,
            endpoint=config.endpoint,
            peers={i: ep for i, ep in enumerate(config.nodes) if i != config.rank},
            curve=curve,
            kinds=ALL_KINDS,
        )
        self.membership = Membership(
            self.transport,
            [i for i in range(config.n_nodes) if i != config.rank],
            DetectorConfig(
                interval=self.policy.cluster.heartbeat_interval,
                timeout=self.policy.cluster.peer_timeout,
            ),
            info=self._info,
        )
        self.keeper = PointKeeper(
            config,
            self.arenas,
            self.store,
            lambda: self.membership,
            lambda: ExecutorState.JOINING if self.executor is None else self.executor.state,
        )
        self.monitor: Monitor | None = None
        self.executor: Executor | None = None
        self.context = NodeContext(
            config=config,
            transport=self.transport,
            membership=self.membership,
            arenas=self.arenas,
            store=self.store,
            tiers=self._tiers,
            run_dir=self._tmp,
            agent_endpoint=ipc_endpoint(self._tmp, "agent"),
            monitor=lambda: self.monitor,
            keeper=self.keeper,
        )
        self.arenas.add_heartbeat_hook(self._heartbeat)
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

    def _corrupt(self, rank: int, step: int, reason: str) -> None:
        if self.executor is not None:
            self.executor.corrupt(rank, step, reason)

    def _request(self, req: p.Request) -> None:
        if self.executor is not None:
            self.executor.local_request(req)

    def _committed(self, event: CommitEvent) -> None:
        ref = whereis(REPLICAS)
        if ref is not None and event.info.source == Source.LOCAL:
            ref.cast(LocalCommit(event.rank))

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
            await nursery.start(serve_requests, self.context.agent_endpoint, self.arenas.handle)
            task_status.started()

    async def serve_monitor(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        monitor = Monitor(self.policy, self._detected)
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
        self.executor = executor
        try:
            ended = await executor.run(task_status=task_status)
            self.exit_code = ended.exit_code
        finally:
            self.generation = executor.generation
            self.executor = None

    def tree(self) -> Supervisor:
        """The node's supervision tree."""
        s = self.policy.supervision
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
            ],
            strategy="rest_for_one",
            max_restarts=s.max_restarts,
            max_seconds=s.max_seconds,
            auto_shutdown="any_significant",
        )

    def close(self) -> None:
        """Release what the node owns: persist queue drained, arenas unmapped and removed."""
        for unregister in self._unregister:
            unregister()
        if self.persister is not None:
            self.persister.close()
        self.store.close()
        self.arenas.close()
        if self._own_tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _has_peers(config: NodeConfig) -> bool:
    """Whether this node pushes its shards to group peers."""
    return config.n_nodes > 1 and config.policy.replication.replicas > 1


def _port_of(endpoint: str) -> str:
    return normalize_endpoint(endpoint).rpartition(":")[2]


async def run_node(config: NodeConfig, *, curve: CurveKeys | None = None) -> int:
    """Run one node agent until training finished, recovery gave up, or a signal; returns
    the process exit code."""
    rt = NodeRuntime(config, curve=curve)
    stopped_by: int | None = None
    try:
        async with trio.open_nursery() as nursery:

            async def signals() -> None:
                nonlocal stopped_by
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
                    async for signum in received:
                        stopped_by = signum
                        log.warning("stopping on signal", signal=signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(signals)
            try:
                await rt.tree().run()
            except GaveUp as exc:
                log.error("the node's supervision tree gave up", error=str(exc))
                rt.exit_code = EXIT_INTERNAL
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(rt.close)
    if stopped_by is not None:
        return 128 + stopped_by
    if rt.exit_code is None:
        return EXIT_INTERNAL
    return rt.exit_code
