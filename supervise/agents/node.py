"""The node agent: one OS process per node running the node's supervision tree.

``rest_for_one``, in order: transport (zmq to the peers), membership (heartbeats, failure
detector), local (the workers' snapshot endpoint, ``SUPERVISE_AGENT``), replicas
(`ReplicaHolder`), monitor, executor (which owns the training workers). The snapshot arenas,
the replica store and the persist tiers belong to the node itself (`NodeRuntime`), not to a
child, so a child's crash and restart loses no committed snapshot.

Exit codes of `run_node`: 0 training finished, 1 the node's own tree gave up (internal
failure), 3 recovery gave up (exhausted, or the policy said stop), 128 + N stopped by signal N.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from supervise._validation import InvalidValue
from supervise.agents._capture_spans import CaptureSpans
from supervise.agents._shards import ArenaShards
from supervise.agents.coordinator import Coordinator
from supervise.agents.executor import Executor
from supervise.agents.messages import ALL_KINDS
from supervise.agents.monitor import Detection, Monitor
from supervise.agents.replica_holder import ReplicaHolder
from supervise.cluster import CurveKeys, Transport
from supervise.cluster.failure_detector import DetectorConfig
from supervise.cluster.ipc import ipc_endpoint, serve_requests
from supervise.cluster.membership import Membership
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.transport import normalize_endpoint
from supervise.policy import Policy
from supervise.runtime import GaveUp, OutputLine, ServerRef, Supervisor, child, whereis
from supervise.snapshot.budget import MemoryBudget, total_ram
from supervise.snapshot.persist import Persister, PersistTier
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService
from supervise.telemetry import get_telemetry

log = structlog.get_logger("supervise.agents.node")

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_GAVE_UP = 3


def _nodes(value: Sequence[str]) -> tuple[str, ...]:
    nodes = tuple(value)
    if not nodes:
        raise InvalidValue("nodes", value, "must list at least one host:port")
    for ep in nodes:
        try:
            normalize_endpoint(ep)
        except ValueError:
            raise InvalidValue("nodes", ep, "each entry must be host:port") from None
    if len(set(nodes)) != len(nodes):
        raise InvalidValue("nodes", ",".join(nodes), "entries must be distinct")
    return nodes


def _command(value: Sequence[str]) -> tuple[str, ...]:
    cmd = tuple(value)
    if not cmd or not all(isinstance(a, str) and a for a in cmd):
        raise InvalidValue("command", value, "must be a non-empty command, e.g. python train.py")
    return cmd


@attrs.frozen(slots=True)
class NodeConfig:
    """Everything one node agent is started with (``supervise node`` builds it)."""

    rank: int = attrs.field()
    nodes: tuple[str, ...] = attrs.field(converter=_nodes)
    command: tuple[str, ...] = attrs.field(converter=_command)
    policy: Policy = attrs.field(factory=Policy.default)
    nproc_per_node: int = attrs.field(default=1)
    shm_dir: str = "/dev/shm"
    run_dir: str | None = None
    worker_shutdown: float = 5.0
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None

    def __attrs_post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise InvalidValue("rank", self.rank, "must be an integer")
        if not 0 <= self.rank < len(self.nodes):
            raise InvalidValue(
                "rank", self.rank, f"must be in 0..{len(self.nodes) - 1} (one per --nodes entry)"
            )
        if isinstance(self.nproc_per_node, bool) or not isinstance(self.nproc_per_node, int):
            raise InvalidValue("nproc_per_node", self.nproc_per_node, "must be an integer >= 1")
        if self.nproc_per_node < 1:
            raise InvalidValue("nproc_per_node", self.nproc_per_node, "must be an integer >= 1")

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self.n_nodes * self.nproc_per_node

    def ranks_of(self, node: int) -> range:
        """The global ranks node ``node`` runs."""
        return range(node * self.nproc_per_node, (node + 1) * self.nproc_per_node)

    @property
    def ranks(self) -> range:
        return self.ranks_of(self.rank)

    @property
    def master_addr(self) -> str:
        """Where rank 0's rendezvous runs: the host of node 0."""
        return normalize_endpoint(self.nodes[0]).removeprefix("tcp://").rpartition(":")[0]

    @property
    def hosts_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def endpoint(self) -> str:
        return self.nodes[self.rank]


class NodeRuntime:
    """What a node owns across its children's restarts, and the references between them."""

    def __init__(self, config: NodeConfig, *, curve: CurveKeys | None = None) -> None:
        self.config = config
        self.policy = config.policy
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.generation = 0
        self._tmp = Path(config.run_dir or tempfile.mkdtemp(prefix=f"supervise-n{config.rank}-"))
        self._own_tmp = config.run_dir is None
        self.agent_endpoint = ipc_endpoint(self._tmp, "agent")
        self.run_dir = self._tmp  # the agent's private files: sockets, spares' go orders
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
                self.tier,
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
        self.monitor: Monitor | None = None
        self.executor: Executor | None = None
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
        ]

    # -- hooks routed to whichever child incarnation is current ---------------------------

    def _heartbeat(self, rank: int, step: int, metrics: Mapping[str, float]) -> None:
        if self.monitor is not None:
            self.monitor.heartbeat(rank, step, metrics)

    def _corrupt(self, rank: int, step: int, reason: str) -> None:
        if self.executor is not None:
            self.executor.corrupt(rank, step, reason)

    def _request(self, req: Any) -> None:
        if self.executor is not None:
            self.executor.local_request(req)

    def _committed(self, event: Any) -> None:
        ref = self.replicas
        if ref is not None and event.info.source == "local":
            from supervise.agents.replica_holder import LocalCommit

            ref.cast(LocalCommit(event.rank))

    def arenas_hooks(self, executor: Executor) -> None:
        """Called by the executor when it starts: the hooks now reach it."""
        self.executor = executor

    @property
    def replicas(self) -> ServerRef | None:
        return whereis("replicas")

    def tier(self, rank: int) -> PersistTier:
        return self._tiers[rank]

    def on_worker_output(self, line: OutputLine) -> None:
        """Workers' output already goes to the log line by line; nothing more to do here."""

    def load_from_disk(self, rank: int, step: int) -> int:
        """Bring ``rank``'s persisted shard of ``step`` into its arena (runs in a thread)."""
        tier = self._tiers[rank]
        entry = next((e for e in tier.entries() if e.manifest.step == step), None)
        if entry is None:
            raise LookupError(f"rank {rank} step {step} is not on disk in {tier.path}")
        self.arenas.ingest(rank, entry.manifest, lambda view: tier.load(entry, view), source="disk")
        return entry.manifest.nbytes

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

    def _info(self) -> Mapping[str, Any]:
        return self.executor.info() if self.executor is not None else {"state": "joining"}

    async def serve_local(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_requests, self.agent_endpoint, self.arenas.handle)
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
        executor = Executor(self)
        executor.coordinator = Coordinator(self, executor)
        self.executor = executor
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(executor.run)
                task_status.started()
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
                    id="replicas",
                    name="replicas",
                    node=self.config.rank,
                    n_nodes=self.config.n_nodes,
                    membership=self.membership,
                    store=self.store,
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
                rt.exit_reason = f"node supervision gave up: {exc}"
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(rt.close)
    if stopped_by is not None:
        return 128 + stopped_by
    if rt.exit_code is None:
        return EXIT_INTERNAL
    return rt.exit_code
