"""A node that does not see this node as the coordinator yet (its view lags by a heartbeat:
a new leader's key, a lower peer declared lost) refuses its prepare; the coordinator asks
again while views converge instead of failing the recovery attempt."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from supervise.agents import messages as m
from supervise.agents.coordinator import AttemptFailed, Coordinator
from supervise.cluster import RemoteError
from supervise.cluster.failure_detector import PeerBack
from supervise.policy import Policy
from supervise.telemetry.names import Trigger


class _Transport:
    """Node 1 refuses ``refusals`` prepares as "not the coordinator", then answers."""

    def __init__(self, refusals: int, reason: str) -> None:
        self.refusals, self.reason, self.asked = refusals, reason, 0

    async def request(self, node: int, message: object, **_kw: object) -> Any:
        self.asked += 1
        if self.asked <= self.refusals:
            raise RemoteError("agent.prepare", f"refused: node 0 {self.reason}")
        return SimpleNamespace(body=f"holding of node {node}")


def _coordinator(transport: _Transport) -> Coordinator:
    policy = Policy.from_dict({"cluster": {"heartbeat_interval": 0.5, "peer_timeout": 4.0}})

    class _Node:
        finished_nodes: set[int] = set()

        async def prepare(self, generation: int) -> str:
            return "holding of node 0"

    ctx: Any = SimpleNamespace(
        config=SimpleNamespace(rank=0, n_nodes=2, worker_shutdown=1.0),
        policy=policy,
        transport=transport,
        seat=None,
    )
    return Coordinator(ctx, _Node())  # type: ignore[arg-type]


async def test_a_prepare_refused_while_views_converge_is_asked_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transport = _Transport(3, f"{m.NOT_COORDINATOR} (node 1 is elected)")
    replies: dict[int, Any] = dict(await _coordinator(transport)._prepare_all(7, {}))
    assert replies == {0: "holding of node 0", 1: "holding of node 1"}
    assert transport.asked == 4


async def test_a_node_that_keeps_refusing_or_refuses_for_another_reason_fails_the_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    with pytest.raises(AttemptFailed, match=m.NOT_COORDINATOR):
        await _coordinator(_Transport(100, m.NOT_COORDINATOR))._prepare_all(7, {})
    assert trio.current_time() - start <= 4.0 + 0.5  # for peer_timeout, not longer
    other = _Transport(1, "asked for rank 9: no")
    with pytest.raises(AttemptFailed, match="rank 9"):
        await _coordinator(other)._prepare_all(7, {})
    assert other.asked == 1


async def test_a_manual_recovery_asked_during_a_recovery_is_refused_not_ignored() -> None:
    """`supervise recover` while a recovery runs: refused with the reason (it said "recovery
    requested" and exit 0, then the coordinator ignored it)."""
    coordinator = _coordinator(_Transport(0, ""))
    coordinator._recovery = SimpleNamespace()  # type: ignore[assignment]
    with pytest.raises(ValueError, match="a recovery is in progress"):
        await coordinator.manual(-1, {})


async def test_an_unreachable_store_is_waited_for_not_an_attempt_spent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A fenced write while etcd is down: retried with backoff until the store answers (an
    outage during a recovery spent every attempt in half a second and the nodes gave up);
    past ``cluster.rejoin_timeout`` the attempt fails."""
    from supervise.store import StoreUnavailable

    coordinator = _coordinator(_Transport(0, ""))
    calls = 0

    async def write(fail: int) -> None:
        nonlocal calls
        calls += 1
        if calls <= fail:
            raise StoreUnavailable("txn", "etcd down")

    await coordinator._fence(lambda: write(5))
    assert calls == 6
    calls = 0
    start = trio.current_time()
    with pytest.raises(AttemptFailed, match="the store did not take the decision"):
        await coordinator._fence(lambda: write(10**9))
    assert trio.current_time() - start <= coordinator.ctx.policy.cluster.rejoin_timeout
    assert calls > 5


class _Replaced(Exception):
    """Raised by the stubbed selection: the prepare loop is over."""


class _DiesOnce:
    """Node 1's first prepare fails (its process was killed); ``then`` runs at that moment
    (membership hears of the replacement, or not), and its next prepare answers."""

    def __init__(self, then: Any) -> None:
        self.then, self.asked = then, 0

    async def request(self, node: int, message: object, **_kw: object) -> Any:
        self.asked += 1
        if self.asked == 1:
            self.then()
            raise ConnectionError("node 1 went away")
        return SimpleNamespace(body=SimpleNamespace(holdings=dict))


async def _attempt_once(coordinator: Coordinator) -> None:
    coordinator.ctx.membership = SimpleNamespace(live=lambda: [0, 1])

    async def prepare(generation: int) -> Any:
        return SimpleNamespace(holdings=dict)

    coordinator.node.prepare = prepare  # type: ignore[method-assign]

    def select(*_a: object, **_kw: object) -> None:
        raise _Replaced

    coordinator._select = select  # type: ignore[method-assign]
    await coordinator._attempt(Trigger.WORKER_EXIT, None, attempt=1, version=None)


async def test_a_node_replaced_during_the_prepare_is_prepared_again_in_the_same_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """kill -9 of a node's agent and its replacement joining while the prepare was asked: the
    replacement is asked again within the attempt and generation (it cost a second attempt,
    and a generation, when the replacement was live before the failed prepare returned)."""
    coordinator = _coordinator(_DiesOnce(lambda: None))
    coordinator.node.known_generation = lambda: 1  # type: ignore[attr-defined]
    transport = _DiesOnce(
        lambda: coordinator.membership_event(PeerBack(1, incarnation=7, restarted=True))
    )
    coordinator.ctx.transport = transport
    with pytest.raises(_Replaced):
        await _attempt_once(coordinator)
    assert transport.asked == 2
    # a failure with no change of membership still fails the attempt
    coordinator.ctx.transport = _DiesOnce(lambda: None)
    with pytest.raises(AttemptFailed, match="node 1 went away"):
        await _attempt_once(coordinator)


async def test_a_node_whose_agent_is_still_starting_is_asked_again_not_failed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a replacement (or a standby taking over) heartbeats before its executor handles requests
    transport = _Transport(2, "")
    transport.reason = "no handler for message kind 'agent.prepare'"

    async def request(node: int, message: object, **_kw: object) -> Any:
        transport.asked += 1
        if transport.asked <= 2:
            raise RemoteError("agent.prepare", transport.reason)
        return SimpleNamespace(body=f"holding of node {node}")

    transport.request = request  # type: ignore[method-assign]
    started = trio.current_time()
    replies: dict[int, Any] = dict(await _coordinator(transport)._prepare_all(7, {}))
    assert replies == {0: "holding of node 0", 1: "holding of node 1"}
    assert transport.asked == 3
    assert trio.current_time() - started < 0.5  # within milliseconds, not a heartbeat each
