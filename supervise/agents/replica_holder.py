"""ReplicaHolder: the node's replication as a supervised Server.

Holds the group peers' committed shards in RAM within ``retention.memory_budget``, serves
their pushes and fetches, and pushes this node's newly committed shards to its group peers in
the background (see :mod:`supervise.cluster.replicator`). It sits under the node's
supervisor after the transport (rest_for_one): a transport restart restarts it too.

Talk to it through its ref:

- ``ref.cast(LocalCommit(rank))``: a local shard was committed: push it (never waits);
- ``await ref.call(FetchShard(rank, version=None))``: pull a shard this node lacks from a
  group peer into the local shards (a replacement node); returns its :class:`ShardMeta`;
- ``await ref.call(STATUS)``: held replicas, local versions, pushes in flight.

The :class:`ReplicaStore` may be owned by the caller and passed in, so that a crash and
restart of this server keeps every verified replica (only transfers in flight are dropped).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio

from supervise.cluster.errors import ClusterError
from supervise.cluster.failure_detector import Event
from supervise.cluster.local import LocalShards
from supervise.cluster.membership import Membership
from supervise.cluster.placement import place
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.replicator import ReplicationService, ReplicationTuning
from supervise.cluster.shard import ShardMeta
from supervise.cluster.transport import Transport
from supervise.policy import Policy
from supervise.runtime import ExitReason, Server

log = structlog.get_logger("supervise.agents.replica_holder")

STATUS = "status"
#: The name a node registers its ReplicaHolder under (`whereis(REPLICAS)`).
REPLICAS = "replicas"


@attrs.frozen(slots=True)
class LocalCommit:
    """Cast: rank ``rank``'s shard was committed locally."""

    rank: int


@attrs.frozen(slots=True)
class FetchShard:
    """Call: fetch rank ``rank``'s shard (``version`` or the newest) from a group peer."""

    rank: int
    version: int | None = None


@attrs.frozen(slots=True)
class FetchResult:
    """Reply to FetchShard: the fetched shard's meta, or why no live holder could provide it."""

    meta: ShardMeta | None
    error: str


async def fetch_shard_via(
    ref: Any,
    rank: int,
    version: int | None = None,
    *,
    timeout: float = 300.0,  # noqa: ASYNC109 (the whole fetch: GiBs take seconds)
) -> ShardMeta:
    """Ask a ReplicaHolder to fetch a shard; raises LookupError when no live holder has it."""
    result: FetchResult = await ref.call(FetchShard(rank, version), timeout=timeout)
    if result.meta is None:
        raise LookupError(result.error)
    return result.meta


@attrs.frozen(slots=True)
class _ServiceFailed:
    error: BaseException


class ReplicationFailed(ClusterError):
    """The replication service crashed; the holder exits so its supervisor restarts it."""


def replica_budget(policy: Policy, *, local_bytes: int = 0, total_ram: int | None = None) -> int:
    """Bytes left for peers' replicas: ``retention.memory_budget`` of the host's RAM, minus
    what the local arenas take. A one-line error when nothing is left.
    """
    if total_ram is None:
        total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = policy.retention.memory_budget.resolve(total_ram) - local_bytes
    if budget <= 0:
        raise ValueError(
            f"retention.memory_budget = {policy.retention.memory_budget} leaves nothing for "
            f"peers' replicas after the local arenas ({local_bytes} bytes)"
        )
    return budget


class ReplicaHolder(Server):
    """Peers' shards in this node's RAM; this node's shards pushed to its group peers."""

    service: ReplicationService
    store: ReplicaStore
    _scope: trio.CancelScope | None
    _owns_store: bool
    _attach: Callable[[ReplicationService | None], None] | None

    async def init(
        self,
        transport: Transport,
        policy: Policy,
        local: LocalShards,
        *,
        node: int,
        n_nodes: int,
        ranks_per_node: int | None = 1,
        membership: Membership | None = None,
        store: ReplicaStore | None = None,
        budget: int | None = None,
        tuning: ReplicationTuning | None = None,
        attach: Callable[[ReplicationService | None], None] | None = None,
    ) -> None:
        """``attach``: told the replication service once it runs and None when it stops (the
        node's `PointKeeper` sets the push order and reads the replica lag through it).
        ``ranks_per_node``: pushes and fetches are checked against the placement (rank R on
        node R // ranks_per_node); None serves anyone (tests that read replicas as a client)."""
        replicas = min(policy.replication.replicas, n_nodes)
        if replicas < policy.replication.replicas:
            log.warning(
                "fewer nodes than replicas", replicas=policy.replication.replicas, nodes=n_nodes
            )
        placement = place(n_nodes, replicas, policy.replication.placement)
        self._owns_store = store is None
        if store is None:
            store = ReplicaStore(
                budget if budget is not None else replica_budget(policy),
                keep_last=policy.retention.keep_last,
            )
        else:
            for rec in store.receptions():  # the previous incarnation's partial transfers
                store.abort(rec.id)
        self.store = store
        self.service = ReplicationService(
            transport,
            store,
            local,
            placement,
            node=node,
            tuning=tuning,
            ranks_per_node=ranks_per_node,
            every=policy.replication.every_seconds,
        )
        events: trio.MemoryReceiveChannel[Event] | None = (
            membership.subscribe() if membership is not None else None
        )
        started = trio.Event()
        self._scope = transport.spawn(self._run, events, started, name=f"replicas {node}")
        await started.wait()
        self._attach = attach
        if attach is not None:
            attach(self.service)
        for rank in local.ranks():  # push what is already committed
            self.service.committed(rank)

    async def _run(
        self, events: trio.MemoryReceiveChannel[Event] | None, started: trio.Event
    ) -> None:
        try:

            async def run(task_status: trio.TaskStatus[Any]) -> None:
                await self.service.run(events=events, task_status=task_status)

            async with trio.open_nursery() as nursery:
                await nursery.start(run)
                started.set()
        except Exception as exc:
            started.set()
            self.ref.cast(_ServiceFailed(exc))
            raise

    def handle_cast(self, message: Any) -> None:
        if isinstance(message, LocalCommit):
            self.service.committed(message.rank)
        elif isinstance(message, _ServiceFailed):
            raise ReplicationFailed(
                f"replication service failed: {type(message.error).__name__}: {message.error}"
            ) from message.error
        else:
            raise TypeError(f"ReplicaHolder got an unknown cast: {message!r}")

    async def handle_call(self, request: Any) -> Any:
        if request == STATUS:
            return self.service.status()
        if isinstance(request, FetchShard):
            # an unavailable shard is an answer, not a crash of the holder
            try:
                meta = await self.service.fetch(request.rank, request.version)
            except LookupError as exc:
                return FetchResult(None, str(exc))
            return FetchResult(meta, "")
        raise TypeError(f"ReplicaHolder got an unknown call: {request!r}")

    def terminate(self, reason: ExitReason) -> None:
        attach = getattr(self, "_attach", None)
        if attach is not None:
            attach(None)
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
        if self._owns_store:
            self.store.close()
