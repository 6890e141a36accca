"""PointKeeper: the node's side of the cluster's recoverable point (`supervise.cluster.
recovery_point`), run on every heartbeat: what this node holds of the target, the leader's
rounds or following them, and the pins that keep the point and the target (arenas, replica
store, push order). Also the replica lag of the node's ranks, for status and the gauge."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from supervise.agents.config import NodeConfig
from supervise.agents.lifecycle import ExecutorState
from supervise.agents.messages import INFO_STATE
from supervise.cluster.membership import Membership
from supervise.cluster.placement import held_by, place
from supervise.cluster.recovery_point import INFO_KEY, Mark, RecoveryPoint, Report
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.replicator import ReplicationService
from supervise.snapshot.service import ArenaService

log = structlog.get_logger("supervise.agents.keeper")


class PointKeeper:
    """Keeps this node's share of the recoverable point; `tick` on every heartbeat."""

    def __init__(
        self,
        config: NodeConfig,
        arenas: ArenaService,
        store: ReplicaStore,
        membership: Callable[[], Membership],
        state: Callable[[], str],
    ) -> None:
        """``state``: this node's executor state (`ExecutorState` value); pins only shrink
        while every node is running."""
        policy = config.policy
        self.config = config
        self.arenas = arenas
        self.store = store
        self._membership = membership
        self._state = state
        self.service: ReplicationService | None = None  # set while the ReplicaHolder runs
        replicas = min(policy.replication.replicas, config.n_nodes)
        placement = place(config.n_nodes, replicas, policy.replication.placement)
        self._replica_ranks = [
            r for n in held_by(placement, config.rank) for r in config.ranks_of(n)
        ]
        self.point = RecoveryPoint(
            config.rank,
            range(config.n_nodes),
            interval=policy.cluster.heartbeat_interval,
            stride=max(policy.snapshot.every_steps, 1),
            spacing=policy.replication.every_seconds,
        )
        self._applied: frozenset[Mark] | None = None

    # -- queries -----------------------------------------------------------------------------

    def lag(self) -> dict[int, int]:
        """Steps each local rank's replicas trail its newest local snapshot (slowest peer)."""
        service = self.service
        if service is None:
            return {}
        return {r: lag for r in self.config.ranks if (lag := service.lag(r)) is not None}

    @property
    def recoverable(self) -> Mark | None:
        """The newest version this node knows to be complete across the cluster."""
        return self.point.point

    # -- the heartbeat -----------------------------------------------------------------------

    def tick(self, now: float) -> dict[str, Any]:
        """Lead or follow the rounds, pin what they keep; returns the heartbeat info entry."""
        ms = self._membership()
        try:
            if ms.is_root:
                reports: dict[int, Report | None] = {self.config.rank: self._report()}
                for node in range(self.config.n_nodes):
                    if node != self.config.rank and ms.is_alive(node):
                        reports[node] = Report.from_wire((ms.peer_info(node) or {}).get(INFO_KEY))
                self.point.lead(reports, now)
            else:
                self.point.follow(Report.from_wire((ms.peer_info(ms.root) or {}).get(INFO_KEY)))
            self._apply()
            return {INFO_KEY: self._report().to_wire()}
        except Exception:  # a heartbeat must go out whatever happens here
            log.exception("recoverable point update failed")
            return {}

    def apply(self, service: ReplicationService | None) -> None:
        """The ReplicaHolder's replication service started (or stopped)."""
        self.service = service
        if service is not None and self._applied is not None:
            service.prioritize(self._applied)

    def _settled(self) -> bool:
        """Whether every node is training: no recovery is selecting, fetching or restoring a
        version a pin keeps."""
        if self._state() != ExecutorState.RUNNING:
            return False
        ms = self._membership()
        return all(
            ms.is_alive(n) and (ms.peer_info(n) or {}).get(INFO_STATE) == ExecutorState.RUNNING
            for n in range(self.config.n_nodes)
            if n != self.config.rank
        )

    def _apply(self) -> None:
        keep = self.point.protected
        if self._applied is not None and not self._settled():
            keep |= self._applied  # nothing is let go while a recovery may be restoring it
        if keep == self._applied:
            return
        steps = {step for _, step in keep}
        for rank in self.config.ranks:
            self.arenas.pin(rank, steps)
        self.store.protect(keep)
        if self.service is not None:
            self.service.prioritize(keep)
        self._applied = keep

    def _report(self) -> Report:
        target = self.point.target
        newest: list[Mark] = []
        have = target is not None
        missed = False
        for rank in self.config.ranks:
            held = self.arenas.versions_by_step(rank)
            if not held:
                have = False
                newest = []
                break
            marks = [(v.generation, v.step) for v in held.values()]
            newest.append(max(marks))
            if target is None:
                continue
            info = held.get(target[1])
            if info is None or info.generation != target[0]:
                have = False
                if any(m > target for m in marks):
                    missed = True  # went past the target without capturing it
        if target is not None and have:
            for rank in self._replica_ranks:
                rep = self.store.get(rank, target[1])
                if rep is None or rep.meta.generation != target[0]:
                    have = False
                    break
        oldest_newest = min(newest) if len(newest) == len(self.config.ranks) else None
        return self.point.report(have=have, missed=missed, newest=oldest_newest)
