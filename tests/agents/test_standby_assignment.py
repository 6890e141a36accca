"""The coordinator's standby assignment (virtual time): the oldest live standby takes the
lowest lost rank, a standby not heard for ``peer_timeout`` is dropped (its rank goes to the
next), two losses with two standbys are both covered, a standby that took its rank is a node."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from supervise.agents import messages as m
from supervise.agents.coordinator import Coordinator
from supervise.agents.lifecycle import ExecutorState
from supervise.agents.standbys import Standbys
from supervise.policy import Policy

NODES = ("127.0.0.1:7100", "127.0.0.1:7101", "127.0.0.1:7102")


class _Membership:
    def __init__(self, live: list[int]) -> None:
        self.alive = live

    def live(self) -> list[int]:
        return list(self.alive)


class _Transport:
    def __init__(self) -> None:
        self.peers = {1: "tcp://127.0.0.1:7101", 2: "tcp://127.0.0.1:7102"}
        self.sent: list[tuple[int, object]] = []

    def set_peer(self, rank: int, endpoint: str) -> None:
        self.peers[rank] = f"tcp://{endpoint}"

    def try_send(self, node: int, message: object) -> bool:
        self.sent.append((node, message))
        return True


class _Node:
    def __init__(self, generation: int) -> None:
        self.state = ExecutorState.RUNNING
        self.finished_nodes: set[int] = set()
        self.generation = generation

    def coordinator_rank(self) -> int:
        return 0

    def known_generation(self) -> int:
        return self.generation


def _coordinator(live: list[int], *, generation: int = 1) -> tuple[Coordinator, _Transport]:
    policy = Policy.from_dict({"cluster": {"heartbeat_interval": 0.5, "peer_timeout": 4.0}})
    transport = _Transport()
    ctx: Any = SimpleNamespace(
        config=SimpleNamespace(rank=0, n_nodes=3, nodes=NODES, endpoint=NODES[0]),
        policy=policy,
        membership=_Membership(live),
        transport=transport,
        seat=None,
    )
    return Coordinator(ctx, _Node(generation)), transport  # type: ignore[arg-type]


def _hello(port: int, since: float) -> m.StandbyHello:
    ep = f"127.0.0.1:{port}"
    return m.StandbyHello(f"tcp://{ep}", ep, since)


async def test_the_oldest_standby_takes_the_lost_rank_and_every_node_hears_the_move(
    autojump_clock: trio.testing.MockClock,
) -> None:
    coordinator, transport = _coordinator([0, 1, 2])
    young, old = _hello(7201, since=200.0), _hello(7200, since=100.0)
    assert coordinator.standby_hello(young).rank == -1  # nothing lost: both wait
    assert coordinator.standby_hello(old).rank == -1
    coordinator.ctx.membership.alive = [0, 1]  # node 2 lost
    await trio.sleep(1.0)
    assert coordinator.standby_hello(young).rank == -1  # the older one is chosen...
    order = coordinator.standby_hello(old)
    assert order.rank == 2  # ...whoever greets first
    assert order.nodes == [NODES[0], "tcp://127.0.0.1:7101", "tcp://127.0.0.1:7200"]
    assert transport.peers[2] == "tcp://127.0.0.1:7200"
    assert transport.sent == [(1, m.RankMoved(2, "127.0.0.1:7200"))]
    assert coordinator.standby_hello(old).rank == 2  # asked again (a reply lost): the same
    assert len(transport.sent) == 1  # the move is said once


async def test_a_standby_not_heard_for_peer_timeout_is_dropped_and_its_rank_reassigned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    coordinator, transport = _coordinator([0, 1])  # node 2 lost
    old, young = _hello(7200, since=100.0), _hello(7201, since=200.0)
    assert coordinator.standby_hello(old).rank == 2
    # the chosen standby dies before it joins: the other one greets on, it does not
    for _ in range(10):
        await trio.sleep(0.5)
        assert coordinator.standby_hello(young).rank in (-1, 2)
    assert coordinator.standby_hello(young).rank == 2
    assert transport.peers[2] == "tcp://127.0.0.1:7201"
    assert [s.name for s in coordinator.standbys.live(trio.current_time())] == [young.name]


async def test_two_losses_with_two_standbys_are_both_covered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    coordinator, _ = _coordinator([0, 1, 2])
    a, b = _hello(7200, since=1.0), _hello(7201, since=2.0)
    assert coordinator.standby_hello(a).rank == coordinator.standby_hello(b).rank == -1
    coordinator.ctx.membership.alive = [0]  # nodes 1 and 2 lost
    assert coordinator.standby_hello(b).rank == 2  # a (older) is kept for rank 1
    assert coordinator.standby_hello(a).rank == 1
    assert coordinator.standbys.assigned == {1: a.name, 2: b.name}


async def test_a_standby_that_joined_is_a_node_and_no_standby_acts_before_the_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    coordinator, _ = _coordinator([0, 1], generation=0)
    s = _hello(7200, since=1.0)
    assert coordinator.standby_hello(s).rank == -1  # not started: node 2 is only slow
    coordinator.node.generation = 1  # type: ignore[attr-defined]
    assert coordinator.standby_hello(s).rank == 2
    coordinator.ctx.membership.alive = [0, 1, 2]  # it joined as node 2
    t = _hello(7201, since=2.0)
    assert coordinator.standby_hello(t).rank == -1
    assert coordinator.standbys.assigned == {}
    assert [e.name for e in coordinator.standbys.live(trio.current_time())] == [t.name]


async def test_a_non_coordinator_notes_standbys_but_assigns_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    coordinator, transport = _coordinator([1])  # this node (0) is not the lowest live...
    coordinator.node.coordinator_rank = lambda: 1  # type: ignore[attr-defined]
    order = coordinator.standby_hello(_hello(7200, since=1.0))
    assert (order.rank, order.coordinator) == (-1, 1)  # greet node 1 often: it hands out ranks
    assert transport.sent == []
    assert len(coordinator.standbys.live(trio.current_time())) == 1  # ready if it leads later


def test_a_standby_takes_only_the_ranks_it_holds_keys_for() -> None:
    standbys = Standbys(timeout=4.0)
    standbys.heard("a", "127.0.0.1:1", 1.0, 0.0, ranks=[2])
    standbys.heard("b", "127.0.0.1:2", 2.0, 0.0, ranks=None)
    assert {r: e.name for r, e in standbys.assign([1, 2], 0.0).items()} == {1: "b", 2: "a"}


def test_workers_rendezvous_where_node_0_is_now_served() -> None:
    from supervise.agents.config import NodeConfig
    from supervise.agents.context import NodeContext

    config = NodeConfig(rank=1, nodes=["10.0.0.1:7100", "10.0.0.2:7100"], command=["true"])
    transport: Any = SimpleNamespace(peers={0: "tcp://10.0.0.1:7100"})
    none: Any = None
    ctx = NodeContext(config, transport, none, none, none, {}, none, "", none, none, none)
    assert ctx.master_addr == "10.0.0.1"
    transport.peers[0] = "tcp://10.0.0.9:7200"  # a standby on another host took node 0 over
    assert ctx.master_addr == "10.0.0.9"
