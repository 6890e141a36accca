"""Membership = live leases (``--store``), in virtual time on one embedded store: a node whose
lease ends is lost at once, long before its heartbeats' timeout (one that says it leaves is
left to its heartbeats); one that is back, the same
process, by the time the coordinator handles that loss restarts nothing (membership did not
change, so the generation does not move)."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from supervise.agents.config import NodeConfig
from supervise.agents.coordinator import Coordinator
from supervise.agents.lifecycle import ExecutorState
from supervise.agents.seat import StoreSeat
from supervise.cluster.failure_detector import DetectorConfig, LossCause, PeerLost
from supervise.cluster.membership import Membership
from supervise.policy import Policy
from supervise.store import EmbeddedStore, parse_store_url
from supervise.telemetry import Trigger

NODES = ("127.0.0.1:29500", "127.0.0.1:29501", "127.0.0.1:29502")
POLICY = Policy.from_dict({"cluster": {"peer_timeout": 2.0, "heartbeat_interval": 0.1}})
MEMBERS = "/supervise/members/members/"


def _seat(rank: int, store: EmbeddedStore) -> StoreSeat:
    config = NodeConfig(
        rank=rank,
        nodes=NODES,
        command=("true",),
        policy=POLICY,
        store=parse_store_url("etcd://127.0.0.1:2379", job="members"),
    )
    return StoreSeat(config, connect=lambda: store)


class _Link:
    """A transport that carries no heartbeat: only the leases can tell a node lost here."""

    rank = 0

    def handle(self, *args: Any, **kwargs: Any) -> None:
        pass

    def unhandle(self, *args: Any, **kwargs: Any) -> None:
        pass

    def try_send(self, peer: int, message: object) -> bool:
        return True


async def test_a_node_whose_lease_ends_is_lost_before_its_heartbeats_time_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    membership = Membership(_Link(), [1, 2], DetectorConfig(interval=1.0, timeout=600.0))
    seat = _seat(0, store)
    seat.on_member_lost = functools.partial(membership.lose, cause=LossCause.LEASE)
    events = membership.subscribe()
    lease = await store.grant(2)  # node 1: a lease and its key, renewed by hand below
    await store.put(f"{MEMBERS}1", b"{}", lease=lease)
    leaving = trio.CancelScope()  # node 2: a seat that leaves (stops, or finished)

    async def node_2() -> None:
        with leaving:
            await _seat(2, store).run()

    async def renew(lease: int, until: float) -> None:
        while trio.current_time() < until:
            await store.keepalive(lease)
            await trio.sleep(0.5)

    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await nursery.start(seat.run)
        start = trio.current_time()
        nursery.start_soon(renew, lease, start + 5)  # node 1 freezes after 5 s
        nursery.start_soon(node_2)
        await trio.sleep(1)
        assert seat.members() == {0, 1, 2}
        with trio.fail_after(10):
            lost = await events.receive()
        assert isinstance(lost, PeerLost)
        assert (lost.rank, lost.cause) == (1, LossCause.LEASE)
        assert trio.current_time() - start < 8  # a lease TTL after the freeze, not 600 s
        assert membership.live() == [0, 2] and seat.members() == {0, 2}
        membership.lose(1, LossCause.LEASE)  # said once
        leaving.cancel()  # node 2 leaves, saying so: its key's end is no loss
        await trio.sleep(1)
        assert seat.members() == {0} and membership.live() == [0, 2]
        assert events.statistics().current_buffer_used == 0
        nursery.cancel_scope.cancel()


class _Running:
    """The parts of a running executor (generation 1) the coordinator's loop reads."""

    state = ExecutorState.RUNNING

    def __init__(self) -> None:
        self.finished_nodes: set[int] = set()
        self.generation = 1

    def known_generation(self) -> int:
        return self.generation


async def test_a_lost_node_back_unchanged_before_its_loss_is_handled_restarts_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    seats = [_seat(rank, store) for rank in range(3)]
    alive = {0, 1, 2}
    membership = SimpleNamespace(is_alive=alive.__contains__)
    ctx: Any = SimpleNamespace(
        config=SimpleNamespace(rank=0, n_nodes=3), policy=POLICY, membership=membership
    )
    ctx.seat = seats[0]
    node = _Running()
    coordinator = Coordinator(ctx, node)  # type: ignore[arg-type]
    recovered: list[tuple[Trigger, dict[str, object]]] = []

    async def recover(kind: Trigger, since: float, evidence: dict[str, object], **kw: Any) -> None:
        recovered.append((kind, evidence))
        node.generation += 1

    coordinator._recover = recover  # type: ignore[method-assign,assignment]
    async with trio.open_nursery() as nursery:
        await nursery.start(seats[0].run)  # rank 0 campaigns first: it leads
        await trio.sleep(1)
        for seat in seats[1:]:
            nursery.start_soon(seat.run)
        await trio.sleep(1)
        await nursery.start(coordinator.run)
        # node 1's lease lapsed, yet it is back (heartbeating, same process) when handled
        coordinator.receive(PeerLost(1, 2.0, cause=LossCause.LEASE), {})
        await trio.sleep(1)
        assert recovered == [] and node.generation == 1  # membership unchanged
        alive.discard(2)  # node 2 is gone for good: a recovery, a new generation
        coordinator.receive(PeerLost(2, 2.0, cause=LossCause.LEASE), {})
        await trio.sleep(1)
        assert [(k, e["peer"], e["cause"]) for k, e in recovered] == [
            (Trigger.PEER_LOST, 2, "lease")
        ]
        assert node.generation == 2
        nursery.cancel_scope.cancel()
