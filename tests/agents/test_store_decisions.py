"""Followers act on decisions they read from the store (``--store``), in virtual time on one
embedded store: a decision under the current leader's fence is acted on once, with or without
the coordinator's message; a message the store does not back, or a record written outside the
leader's fence, is not acted on."""

from __future__ import annotations

import json
from collections.abc import Mapping

import trio
import trio.testing
from structlog.testing import capture_logs

from supervise.agents import messages as m
from supervise.agents.config import NodeConfig
from supervise.agents.decision import Decision
from supervise.agents.follower import DecisionFollower
from supervise.agents.seat import StoreSeat
from supervise.policy import Policy
from supervise.store import EmbeddedStore, LeaseLost, parse_store_url

NODES = ("127.0.0.1:29500", "127.0.0.1:29501", "127.0.0.1:29502")
PREFIX = "/supervise/decisions/"


def _seat(rank: int, store: EmbeddedStore) -> StoreSeat:
    config = NodeConfig(
        rank=rank,
        nodes=NODES,
        command=("true",),
        policy=Policy.from_dict({"cluster": {"peer_timeout": 2.0}}),
        store=parse_store_url("etcd://127.0.0.1:2379", job="decisions"),
    )
    return StoreSeat(config, connect=lambda: store)


async def _hold(
    seat: StoreSeat, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``seat`` until its lease is lost (unsupervised here: it is not restarted)."""
    try:
        await seat.run(task_status=task_status)
    except* LeaseLost:
        pass


class _Node:
    """A follower's executor, as far as restarts go: what it was prepared for, what it began."""

    def __init__(self) -> None:
        self.prepared = -1
        self.began: list[tuple[m.Restart, dict[str, str], int]] = []

    def act(self, restart: m.Restart, trace: Mapping[str, str], leader: int) -> None:
        self.began.append((restart, dict(trace), leader))


async def test_a_follower_restarts_from_the_store_and_never_from_a_message_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    leader, seat = _seat(0, store), _seat(1, store)
    node = _Node()
    follower = DecisionFollower(1, seat, node.act, lambda: node.prepared)
    seat.on_decision = follower.on_store
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(leader.run)
            await trio.sleep(1)
            await nursery.start(seat.run)
            await trio.sleep(1)
            assert leader.leads() and seat.leader_rank() == 0

            # the restart message is dropped: the store's decision alone restarts the node
            node.prepared = 2
            fetch = {0: [], 1: [(1, "ram", 0)]}
            await leader.decide(
                generation=2,
                step=10,
                port=4321,
                attempt=1,
                nodes=[0, 1],
                trigger="nan",
                fetch=fetch,
                rewinds=[(2, 10)],
                trace={"traceparent": "00-ab-cd-01"},
            )
            await trio.sleep(1)
            want = m.Restart(2, 10, 4321, 1, "nan", [(1, "ram", 0)], [(2, 10)])
            assert node.began == [(want, {"traceparent": "00-ab-cd-01"}, 0)]
            await follower.nudge(want, 0)  # the message arriving late changes nothing
            assert len(node.began) == 1

            # a message the store does not back (a forgery, a deposed coordinator's): refused
            node.prepared = 3
            await follower.nudge(m.Restart(3, 10, 4321, 1, "nan"), 0)
            await follower.nudge(want, 2)  # the store's restart, but not from its leader
            refused = [e for e in logs if e["event"].startswith("restart message refused")]
            assert len(refused) == 2 and len(node.began) == 1

            # a record written outside the leader's fence (a wrong term) is not acted on
            forged = Decision(3, 10, 4321, 1, (0, 1)).body()
            forged |= {"leader": 0, "term": 1}
            await store.put(PREFIX + "decision", json.dumps(forged).encode())
            await trio.sleep(1)
            assert len(node.began) == 1

            # the message first: acted on once, whichever of message and watch comes second
            await leader.decide(generation=3, step=15, port=4322, attempt=1, nodes=[0, 1])
            await follower.nudge(m.Restart(3, 15, 4322, 1, ""), 0)
            await trio.sleep(1)
            assert [b[0].generation for b in node.began] == [2, 3]
            taken = [e["via"] for e in logs if e["event"] == "restart taken from the store"]
            assert taken == ["watch", "message"]

            # not prepared for it (a restarted agent reading an old decision): not acted on
            await leader.decide(generation=5, step=20, port=4323, attempt=1, nodes=[0, 1])
            await trio.sleep(1)
            assert len(node.began) == 2

            # the leader's own node and nodes not named are left to their coordinator
            node.prepared = 6
            await leader.decide(generation=6, step=20, port=4324, attempt=1, nodes=[0])
            await trio.sleep(1)
            assert len(node.began) == 2
            nursery.cancel_scope.cancel()


async def test_prepares_need_a_claim_and_a_deposed_leaders_records_are_not_acted_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    first, seat = _seat(0, store), _seat(1, store)
    node = _Node()
    node.prepared = 2
    follower = DecisionFollower(1, seat, node.act, lambda: node.prepared)
    async with trio.open_nursery() as nursery:
        await nursery.start(_hold, first)
        await trio.sleep(1)
        await nursery.start(seat.run)
        await trio.sleep(1)
        # a Prepare stops this node's workers only for the generation its sender claimed
        await first.claim(generation=2, attempt=1, trigger="nan")
        assert await follower.backs_prepare(2, 0)
        assert not await follower.backs_prepare(3, 0)  # not claimed
        assert not await follower.backs_prepare(2, 2)  # claimed, but not by that sender
        await first.decide(generation=2, step=10, port=1, attempt=1, nodes=[0, 1])
        leader = await store.get(PREFIX + "leader")
        assert leader is not None
        await store.revoke(leader.lease)  # the first leader froze past its lease
        await trio.sleep(3)
        assert seat.leads()  # the follower was elected meanwhile
        assert await seat.read_decision() is None  # the old decision is not its leader's
        assert not await follower.backs_prepare(2, 0)  # nor the old claim
        await follower.nudge(m.Restart(2, 10, 1, 1, ""), 0)
        assert node.began == []
        nursery.cancel_scope.cancel()
