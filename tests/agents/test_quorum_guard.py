"""The quorum guard (``--store``): an elected coordinator starts no recovery while fewer than a
majority of the expected nodes hold a live lease; it holds the trigger (one log line, a metric)
and recovers once when the majority is back. Virtual time, real seats on one embedded store."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

import supervise.agents.coordinator as coordinator_module
from supervise.agents import messages as m
from supervise.agents.config import NodeConfig
from supervise.agents.coordinator import Coordinator
from supervise.agents.lifecycle import ExecutorState
from supervise.agents.seat import SeatEvent, SeatNews, StoreSeat
from supervise.policy import Policy
from supervise.store import EmbeddedStore, parse_store_url
from supervise.telemetry import Attr, Trigger
from supervise.telemetry.attributes import attributes

NODES = ("127.0.0.1:29500", "127.0.0.1:29501", "127.0.0.1:29502")
POLICY = Policy.from_dict({"cluster": {"peer_timeout": 2.0, "heartbeat_interval": 0.1}})


def _seat(rank: int, store: EmbeddedStore) -> StoreSeat:
    config = NodeConfig(
        rank=rank,
        nodes=NODES,
        command=("true",),
        policy=POLICY,
        store=parse_store_url("etcd://127.0.0.1:2379", job="quorum"),
    )
    return StoreSeat(config, connect=lambda: store)


class _Running:
    """The parts of a running executor (generation 1) the coordinator's loop reads."""

    state = ExecutorState.RUNNING

    def __init__(self) -> None:
        self.finished_nodes: set[int] = set()
        self.generation = 1

    def known_generation(self) -> int:
        return self.generation


class _Counter:
    def __init__(self) -> None:
        self.added: list[dict[str, str]] = []

    def add(self, amount: int, attributes: dict[str, str]) -> None:
        self.added.append(attributes)


def _crash(node: int) -> m.Failure:
    now = time.time()
    return m.Failure(node, 1, Trigger.WORKER_EXIT.value, now, now, {"rank": node})


async def test_no_recovery_starts_without_a_majority_of_live_leases(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _Counter()
    telemetry = SimpleNamespace(metrics=SimpleNamespace(recoveries_held=held))
    monkeypatch.setattr(coordinator_module, "get_telemetry", lambda: telemetry)
    store = EmbeddedStore()
    seats = [_seat(rank, store) for rank in range(3)]
    ctx: Any = SimpleNamespace(config=SimpleNamespace(rank=0, n_nodes=3), policy=POLICY)
    ctx.seat = seats[0]
    node = _Running()
    coordinator = Coordinator(ctx, node)  # type: ignore[arg-type]
    recovered: list[Trigger] = []

    async def recover(kind: Trigger, *args: object, **kwargs: object) -> None:
        recovered.append(kind)
        node.generation += 1  # the reports of generation 1 are stale now

    coordinator._recover = recover  # type: ignore[method-assign,assignment]
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(seats[0].run)  # rank 0 campaigns first: it leads
            await trio.sleep(1)
            others = []
            for seat in seats[1:]:
                scope = trio.CancelScope()
                others.append(scope)

                async def hold(seat: StoreSeat = seat, scope: trio.CancelScope = scope) -> None:
                    with scope:
                        await seat.run()

                nursery.start_soon(hold)
            await trio.sleep(1)
            await nursery.start(coordinator.run)
            assert seats[0].leads() and seats[0].members() == {0, 1, 2}

            for scope in others:  # two of three nodes leave: their leases are revoked
                scope.cancel()
            await trio.sleep(1)
            assert seats[0].members() == {0} and not seats[0].quorum([0, 1, 2])
            coordinator.receive(_crash(0), {})
            coordinator.receive(_crash(0), {})  # reported again: still one line
            await trio.sleep(10)
            assert recovered == []  # a minority restarts nothing
            assert [h[Attr.TRIGGER] for h in held.added] == ["worker_exit"] * 2
            lines = [e for e in logs if e["event"] == "recovery held: no quorum"]
            assert len(lines) == 1
            assert (lines[0]["members"], lines[0]["expected"], lines[0]["needed"]) == (
                [0],
                [0, 1, 2],
                2,
            )

            nursery.start_soon(_seat(1, store).run)  # node 1 is back: two of three
            await trio.sleep(2)
            assert recovered == [Trigger.WORKER_EXIT]  # once: the second report is stale
            assert any(e["event"] == "quorum regained" for e in logs)
            nursery.cancel_scope.cancel()


def test_the_seats_news_are_span_events_on_the_recovery_under_way() -> None:
    seat = _seat(0, EmbeddedStore())
    ctx: Any = SimpleNamespace(config=SimpleNamespace(rank=0, n_nodes=3), policy=POLICY)
    ctx.seat = seat
    coordinator = Coordinator(ctx, _Running())  # type: ignore[arg-type]
    events: list[tuple[str, dict[str, object]]] = []

    def event(name: str, **short: object) -> None:
        attributes(**short)  # only attributes the tracing helpers accept
        events.append((name, short))

    seat._tell(SeatNews(SeatEvent.ELECTION_WON, 3, 0x5E, 0))  # no recovery: a log line only
    with coordinator._open(SimpleNamespace(event=event)):  # type: ignore[arg-type]
        seat._tell(SeatNews(SeatEvent.FENCED_WRITE_REFUSED, 7, 0x5E, 1))
        seat._tell(SeatNews(SeatEvent.LEASE_REGAINED, lease=0x61))
    seat._tell(SeatNews(SeatEvent.LEASE_LOST, lease=0x61))
    assert events == [
        (
            "store_fenced_write_refused",
            {"store_revision": 7, "store_lease": "5e", "store_leader": 1},
        ),
        ("store_lease_regained", {"store_revision": 0, "store_lease": "61"}),
    ]
