"""A recovery cut short because its coordinator was deposed (``--store``: its lease lapsed in
an etcd outage) hands its trigger over: the nodes it prepared wait at a new generation, where
the new coordinator counts every older report stale, so without it nothing would restart them
(seen in CI: a crash after etcd came back, never recovered)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from supervise.agents import messages as m
from supervise.agents.coordinator import Coordinator, _Deposed
from supervise.agents.executor import Executor
from supervise.agents.lifecycle import ExecutorState
from supervise.policy import Policy
from supervise.telemetry import Trigger

POLICY = Policy.from_dict(
    {
        "cluster": {"peer_timeout": 2.0, "heartbeat_interval": 0.1},
        "recovery": {"backoff": {"initial": 0}},
    }
)


class _Prepared:
    """The deposed coordinator's own executor: prepared at generation 4."""

    state = ExecutorState.RECOVERING
    generation = 4

    def __init__(self) -> None:
        self.finished_nodes: set[int] = set()
        self.handed: list[tuple[str, float, dict[str, Any]]] = []

    def known_generation(self) -> int:
        return self.generation

    def hand_over(self, trigger: str, since: float, evidence: dict[str, Any]) -> None:
        self.handed.append((trigger, since, dict(evidence)))


def _deposed(why: str) -> tuple[Coordinator, _Prepared]:
    """A coordinator whose every attempt finds it deposed, and its node's executor."""
    ctx: Any = SimpleNamespace(config=SimpleNamespace(rank=0, n_nodes=2), policy=POLICY)
    ctx.seat = None
    node = _Prepared()
    coordinator = Coordinator(ctx, node)  # type: ignore[arg-type]

    async def attempt(*args: object, **kwargs: object) -> int:
        raise _Deposed(why)

    coordinator._attempt = attempt  # type: ignore[method-assign,assignment]
    return coordinator, node


async def test_a_deposed_recovery_hands_its_trigger_over() -> None:
    coordinator, node = _deposed("node 0 does not hold the coordinator's seat")
    since = time.time()
    await coordinator._recover(Trigger.PEER_LOST, since, {"peer": 1, "restarted": True})
    assert node.handed == [("peer_lost", since, {"peer": 1, "restarted": True})]


async def test_a_deposed_start_hands_over_as_a_failed_start_does() -> None:
    # nodes prepared for the start count as started (generation 1) to the new coordinator
    coordinator, node = _deposed("lost the seat")
    await coordinator._start()
    assert [(t, e) for t, _, e in node.handed] == [
        ("worker_exit", {"start": "deposed: lost the seat"})
    ]


async def test_the_handed_over_trigger_goes_at_the_newest_generation_until_a_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a peer prepared at generation 4 says so in its heartbeats; this node is still at 3
    membership = SimpleNamespace(live=lambda: [1], peer_info=lambda r: {m.INFO_GENERATION: 4})
    ctx: Any = SimpleNamespace(config=SimpleNamespace(rank=0), policy=POLICY, membership=membership)
    executor = Executor(ctx, generation=3)
    sent: list[m.Failure] = []
    executor.send_to_coordinator = sent.append  # type: ignore[method-assign,assignment]
    executor.state = ExecutorState.RECOVERING  # no restart came: the report is not "heard"
    executor.hand_over("peer_lost", 1.0, {"peer": 1})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(executor._resend_unresolved)
        await trio.sleep(2.0 * 2 + 0.5)
        assert [(f.generation, f.trigger, f.node) for f in sent] == [(4, "peer_lost", 0)] * 3
        assert sent[0].evidence == {"peer": 1}  # the failed node's, if any, stays the evidence's
        executor.generation = 5  # the new coordinator's restart moved this node past it
        await trio.sleep(10)
        assert len(sent) == 3
        nursery.cancel_scope.cancel()
