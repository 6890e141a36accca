"""PointKeeper: a node's pins follow the recoverable point, and none is let go while a
recovery may be restoring the version it keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supervise.agents.config import NodeConfig
from supervise.agents.keeper import PointKeeper
from supervise.agents.messages import INFO_STATE
from supervise.cluster.recovery_point import INFO_KEY, Report
from supervise.cluster.replica_store import ReplicaStore
from supervise.snapshot.budget import MemoryBudget
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService


class Membership:
    def __init__(self) -> None:
        self.infos: dict[int, dict[str, Any]] = {}
        self.root = 0
        self.is_root = False

    def is_alive(self, rank: int) -> bool:
        return True

    def peer_info(self, rank: int) -> dict[str, Any] | None:
        return self.infos.get(rank)


def test_pins_follow_the_point_and_hold_still_while_a_recovery_runs(tmp_path: Path) -> None:
    arenas = ArenaService(
        tmp_path, rule=RetentionRule(keep_last=1), budget=MemoryBudget(1 << 30), pinned_slots=3
    )
    store = ReplicaStore(1 << 20)
    ms = Membership()
    state = ["running"]
    config = NodeConfig(1, ["127.0.0.1:7000", "127.0.0.1:7001"], ["train"])
    keeper = PointKeeper(config, arenas, store, lambda: ms, lambda: state[0])

    def leader(point: tuple[int, int] | None, target: tuple[int, int], node_state: str) -> None:
        ms.infos[0] = {INFO_STATE: node_state, INFO_KEY: Report(point, target).to_wire()}

    leader(None, (0, 10), "running")
    info = keeper.tick(0.0)
    assert Report.from_wire(info[INFO_KEY]) == Report(None, (0, 10))  # holds nothing yet
    assert arenas.pinned(1) == {10} and store.protected == {(0, 10)}
    leader((0, 10), (0, 20), "running")
    keeper.tick(0.2)
    assert arenas.pinned(1) == {10, 20} and store.protected == {(0, 10), (0, 20)}
    # a recovery starts (this node's workers stopped): the next round must not unpin 10
    state[0] = "recovering"
    leader((0, 20), (0, 30), "recovering")
    keeper.tick(0.4)
    assert arenas.pinned(1) == {10, 20, 30}
    state[0] = "running"  # this node runs again, node 0 not yet
    keeper.tick(0.6)
    assert arenas.pinned(1) == {10, 20, 30}
    leader((0, 20), (0, 30), "running")  # every node trains again: 10 goes
    keeper.tick(0.8)
    assert arenas.pinned(1) == {20, 30} and store.protected == {(0, 20), (0, 30)}
    assert keeper.recoverable == (0, 20)
    assert keeper.lag() == {}  # no replication service running
    arenas.close()
    store.close()
