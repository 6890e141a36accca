"""A node that just joined leads nothing before it has heard every live peer's state."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from supervise.agents.coordinator import Coordinator
from supervise.agents.lifecycle import ExecutorState
from supervise.policy import Policy


class _Membership:
    def __init__(self, live: list[int]) -> None:
        self._live = live
        self.infos: dict[int, dict[str, Any]] = {}

    def live(self) -> list[int]:
        return list(self._live)

    def peer_info(self, rank: int) -> dict[str, Any] | None:
        return self.infos.get(rank)


class _Executor:
    """The parts of an Executor the coordinator's loop reads."""

    def __init__(self, membership: _Membership) -> None:
        self.state = ExecutorState.JOINING
        self.finished_nodes: set[int] = set()
        self._ms = membership

    def coordinator_rank(self) -> int:
        established = [
            r for r in self._ms.live() if (self._ms.peer_info(r) or {}).get("state") == "running"
        ]
        return min(established) if established else min(self._ms.live())

    def known_generation(self) -> int:
        return max([0, *((i.get("generation") or 0) for i in self._ms.infos.values())])


def _node0() -> tuple[_Membership, Coordinator, list[float]]:
    """Rank 0 of two, joining; its cluster starts are recorded, not run."""
    membership = _Membership([0, 1])
    policy = Policy.from_dict({"cluster": {"heartbeat_interval": 0.1, "peer_timeout": 1.0}})
    ctx: Any = SimpleNamespace(
        config=SimpleNamespace(rank=0, n_nodes=2), policy=policy, membership=membership, seat=None
    )
    coordinator = Coordinator(ctx, _Executor(membership))
    starts: list[float] = []

    async def start() -> None:
        starts.append(trio.current_time())

    coordinator._start = start  # type: ignore[method-assign]
    return membership, coordinator, starts


async def test_a_new_node_waits_for_its_peers_state_before_starting_anything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    membership, coordinator, starts = _node0()  # a replacement; rank 1 not heard from yet
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        await trio.sleep(5)
        assert starts == []  # before the fix: a cluster start of its own, at once
        # rank 1 is heard: it runs generation 3, so it leads and this node starts nothing
        membership.infos[1] = {"state": "running", "generation": 3}
        await trio.sleep(5)
        assert starts == []
        nursery.cancel_scope.cancel()


async def test_a_fresh_cluster_starts_once_every_peer_was_heard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    membership, coordinator, starts = _node0()
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        await trio.sleep(2)
        assert starts == []
        membership.infos[1] = {"state": "joining", "generation": 0}
        await trio.sleep(0.5)
        assert len(starts) >= 1 and starts[0] >= 2
        nursery.cancel_scope.cancel()
