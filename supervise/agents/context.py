"""What a node's executor and coordinator work with: `NodeContext`, a narrow frozen view of
the node (its config, links to the peers, snapshot stores), handed to them instead of the
whole `NodeRuntime`, so neither reaches into the node or into each other."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from supervise.agents._restore_gate import RestoreGate
from supervise.agents.config import NodeConfig
from supervise.agents.keeper import PointKeeper
from supervise.agents.monitor import Monitor
from supervise.agents.seat import StoreSeat
from supervise.agents.selection import Holdings
from supervise.cluster.membership import Membership
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.shard import ShardMeta
from supervise.cluster.transport import Transport, normalize_endpoint
from supervise.policy import Policy
from supervise.snapshot.manifest import Manifest
from supervise.snapshot.persist import PersistTier
from supervise.snapshot.retention import VersionInfo
from supervise.snapshot.service import ArenaService
from supervise.snapshot.tokens import RankTokens
from supervise.telemetry import Source


@attrs.frozen(slots=True)
class NodeContext:
    """The node's parts that outlive its executor: config, peers, snapshots, the monitor."""

    config: NodeConfig
    transport: Transport
    membership: Membership
    arenas: ArenaService  # this node's workers' snapshot arenas
    store: ReplicaStore  # group peers' shards held here
    tiers: Mapping[int, PersistTier]  # per local rank
    run_dir: Path  # the agent's private files: sockets, spares' go orders
    agent_endpoint: str  # the workers' snapshot endpoint (``SUPERVISE_AGENT``)
    tokens: RankTokens  # the workers' credentials there (``SUPERVISE_AGENT_TOKEN``)
    monitor: Callable[[], Monitor | None]  # the current Monitor (a child: it may restart)
    keeper: PointKeeper  # the recoverable point's pins and the replicas' lag
    seat: StoreSeat | None = None  # with --store etcd://...: the elected coordinator's seat
    # restores held while their shard is fetched (the workers start meanwhile)
    restore_gate: RestoreGate = attrs.field(factory=RestoreGate)

    @property
    def policy(self) -> Policy:
        return self.config.policy

    @property
    def master_addr(self) -> str:
        """Where rank 0's rendezvous runs: node 0's host as this node knows it now (a standby
        on another host may have taken node 0 over)."""
        endpoint = None if self.config.rank == 0 else self.transport.peers.get(0)
        if endpoint is None:
            return self.config.master_addr
        return normalize_endpoint(endpoint).removeprefix("tcp://").rpartition(":")[0]

    def holdings(self) -> Holdings:
        """Every shard version this node holds: its ranks' arenas and the replicas it keeps
        for peers (RAM), its ranks' persisted files (disk)."""
        ranks = self.config.ranks
        ram = [(r, v) for r in ranks for v in self.arenas.versions(r)]
        for rank, reps in self.store.inventory().items():
            for version, generation in reps:
                rep = self.store.get(rank, version)
                if rep is None or rep.meta.generation != generation:
                    continue
                ram.append((rank, _replica_info(version, rep.meta)))
        disk = [(r, e.info) for r in ranks for e in self.tiers[r].entries()]
        return Holdings.of(self.config.rank, ram, disk)

    def load_from_disk(self, rank: int, step: int) -> int:
        """Bring ``rank``'s persisted shard of ``step`` into its arena (runs in a thread);
        returns its size."""
        tier = self.tiers[rank]
        entry = next((e for e in tier.entries() if e.manifest.step == step), None)
        if entry is None:
            raise LookupError(f"rank {rank} step {step} is not on disk in {tier.path}")
        self.arenas.ingest(
            rank, entry.manifest, lambda view: tier.load(entry, view), source=Source.DISK.value
        )
        return entry.manifest.nbytes


def _replica_info(version: int, meta: ShardMeta) -> VersionInfo:
    """A held replica as a version record (its manifest gives the metrics; none if unreadable)."""
    try:
        manifest = Manifest.from_bytes(meta.manifest)
    except Exception:
        return VersionInfo(version, meta.generation, 0.0, meta.nbytes, {}, Source.PEER.value)
    return VersionInfo(
        version,
        meta.generation,
        manifest.wall_time,
        meta.nbytes,
        dict(manifest.metrics),
        Source.PEER.value,
    )
