"""The node's seat in a store-coordinated job, in virtual time on one embedded store: one
leader at a time, and a deposed leader's claims are refused by the store."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

import supervise.runtime as sv
from supervise.agents.config import NodeConfig
from supervise.agents.seat import SeatEvent, SeatNews, StoreSeat
from supervise.policy import Policy
from supervise.store import EmbeddedStore, FencedWriteRefused, LeaseLost, parse_store_url

NODES = ("127.0.0.1:29500", "127.0.0.1:29501")


def _seat(rank: int, store: EmbeddedStore) -> StoreSeat:
    config = NodeConfig(
        rank=rank,
        nodes=NODES,
        command=("true",),
        policy=Policy.from_dict({"cluster": {"peer_timeout": 2.0}}),
        store=parse_store_url("etcd://127.0.0.1:2379", job="seat"),
    )
    return StoreSeat(config, connect=lambda: store)


async def test_a_deposed_leader_is_refused_and_the_other_seat_leads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    first, second = _seat(0, store), _seat(1, store)
    with pytest.RaisesGroup(LeaseLost, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await trio.sleep(1)
            await nursery.start(second.run)
            await trio.sleep(5)  # both renew their leases: the first keeps the seat
            assert first.leads() and not second.leads()
            assert first.leader_rank() == second.leader_rank() == 0
            await first.claim(generation=1, attempt=1, trigger="cluster_start")
            members = await store.range("/supervise/seat/members/", prefix=True)
            assert [r.key.rsplit("/", 1)[1] for r in members.records] == ["0", "1"]

            lease = (await store.get("/supervise/seat/leader")).lease  # type: ignore[union-attr]
            await store.revoke(lease)  # the first's lease ends (as after a freeze)
            with pytest.raises(FencedWriteRefused):  # it still thinks it leads: refused
                await first.decide(generation=2, step=10, port=1, attempt=1, nodes=[0, 1])
            await trio.sleep(1)
            assert second.leads() and second.leader_rank() == 1
            await second.decide(generation=2, step=10, port=1, attempt=1, nodes=[0, 1])
            decision = await store.get("/supervise/seat/decision")
            assert decision is not None and b'"leader": 1' in decision.value
            await trio.sleep_forever()  # the first's keep-alive finds its lease gone: LeaseLost


async def test_the_seat_is_a_supervised_child_that_rejoins_after_losing_its_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    seat = _seat(0, store)
    tree = sv.Supervisor([sv.child(seat.run, id="seat")], max_restarts=3, max_seconds=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree.run)
        await trio.sleep(1)
        old = await store.get("/supervise/seat/members/0")
        assert old is not None and seat.leads()
        await store.revoke(old.lease)
        await trio.sleep(5)  # lost, restarted: a fresh lease, registered, elected again
        new = await store.get("/supervise/seat/members/0")
        assert new is not None and new.lease != old.lease and seat.leads()
        nursery.cancel_scope.cancel()


async def test_the_seat_tells_its_news_with_their_evidence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    first, second = _seat(0, store), _seat(1, store)
    news: dict[int, list[SeatNews]] = {0: [], 1: []}
    first.observer, second.observer = news[0].append, news[1].append
    tree = sv.Supervisor([sv.child(first.run, id="seat")], max_restarts=3, max_seconds=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree.run)
        await trio.sleep(1)
        await nursery.start(second.run)
        await trio.sleep(1)
        leader = await store.get("/supervise/seat/leader")
        assert leader is not None
        won = SeatNews(SeatEvent.ELECTION_WON, leader.create_revision, leader.lease, 0)
        assert news[0] == [won]
        assert news[1] == [attrs.evolve(won, event=SeatEvent.ELECTION_LOST)]

        await store.revoke(leader.lease)  # the first's lease ends (as after a freeze)
        with pytest.raises(FencedWriteRefused):
            await first.claim(generation=2, attempt=1, trigger="worker_exit")
        await trio.sleep(5)  # its keep-alive finds the lease gone; restarted, it follows
        told = {n.event: n for n in news[0]}  # the second's election may come before
        assert [n.event for n in news[0]][:2] == [
            SeatEvent.ELECTION_WON,
            SeatEvent.FENCED_WRITE_REFUSED,
        ]
        refused, lost = told[SeatEvent.FENCED_WRITE_REFUSED], told[SeatEvent.LEASE_LOST]
        assert (refused.revision, refused.lease) == (leader.create_revision, leader.lease)
        assert lost.lease == leader.lease
        assert told[SeatEvent.ELECTION_LOST].leader == 1
        regained = told[SeatEvent.LEASE_REGAINED]
        assert regained.event is SeatEvent.LEASE_REGAINED and regained.lease != leader.lease
        assert second.leads() and news[1][-1].event is SeatEvent.ELECTION_WON
        nursery.cancel_scope.cancel()
