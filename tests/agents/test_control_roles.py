"""Who may send a node agent what: restarts, prepares and give_ups only from the coordinator
(by this node's view, allowing for a lower peer the coordinator declared lost a moment
sooner); failures, progress and finished only from the node they are about; status and
recover from anyone (a client key, with CURVE)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from supervise.agents import messages as m
from supervise.agents.executor import Executor
from supervise.agents.lifecycle import ExecutorState


class _Membership:
    def __init__(self, live: list[int], states: dict[int, str], silent: dict[int, float]):
        self._live, self._states, self._silent = live, states, silent

    def live(self) -> list[int]:
        return self._live

    def peer_info(self, rank: int) -> dict[str, Any] | None:
        state = self._states.get(rank)
        return None if state is None else {m.INFO_STATE: state}

    def silence(self, rank: int) -> float:
        return self._silent.get(rank, 0.1)


def _executor(
    rank: int,
    live: list[int],
    states: dict[int, str],
    silent: dict[int, float] | None = None,
    *,
    seat: Any = None,
) -> Executor:
    ctx: Any = SimpleNamespace(
        seat=seat,
        config=SimpleNamespace(rank=rank),
        membership=_Membership(live, states, silent or {}),
        policy=SimpleNamespace(cluster=SimpleNamespace(peer_timeout=2.0)),
    )
    executor = Executor(ctx)
    executor.state = ExecutorState.RUNNING
    return executor


RUNNING = ExecutorState.RUNNING.value
JOINING = ExecutorState.JOINING.value


def test_only_the_coordinator_drives_restarts() -> None:
    ex = _executor(2, [0, 1, 2], {0: RUNNING, 1: RUNNING})
    assert ex.may_coordinate(0) is None
    assert "node 1 is not the coordinator (node 0 is)" in (ex.may_coordinate(1) or "")
    assert "a client sends no" in (ex.may_coordinate(None) or "")
    assert ex.may_coordinate(7) is not None  # not a live member at all
    # this node is the coordinator itself: no peer gives it orders
    assert ex.may_coordinate(2) is not None
    assert _executor(0, [0, 1], {1: RUNNING}).may_coordinate(1) is not None


def test_a_coordinator_that_saw_a_lower_peer_die_first_is_followed() -> None:
    # node 0 died: node 1 noticed first; here node 0 is still "live" but silent a while
    ex = _executor(2, [0, 1, 2], {0: RUNNING, 1: RUNNING}, silent={0: 1.5})
    assert ex.may_coordinate(1) is None
    # ...but not while node 0 still beats
    assert _executor(2, [0, 1, 2], {0: RUNNING, 1: RUNNING}).may_coordinate(1) is not None


def test_at_the_start_every_node_joins_and_the_lowest_leads() -> None:
    ex = _executor(1, [0, 1, 2], {0: JOINING, 2: JOINING})
    ex.state = ExecutorState.JOINING
    assert ex.may_coordinate(0) is None
    assert ex.may_coordinate(2) is not None
    # a restarted node 0 rejoins while node 1 leads: node 1 still gives the orders
    ex = _executor(2, [0, 1, 2], {0: JOINING, 1: RUNNING})
    assert ex.may_coordinate(1) is None and ex.may_coordinate(0) is not None
    # the replacement node 0 itself: node 1's prepare may come before its first heartbeat
    ex = _executor(0, [0, 1], {})
    ex.state = ExecutorState.JOINING
    assert ex.may_coordinate(1) is None
    # ...but not past a lower node known to be established
    ex = _executor(1, [0, 1, 2], {0: RUNNING})
    ex.state = ExecutorState.JOINING
    assert ex.may_coordinate(2) is not None


def test_a_node_reports_only_for_itself() -> None:
    ex = _executor(0, [0, 1], {1: RUNNING})
    failure = m.Failure(1, 1, "worker_exit", 0.0, 0.0)
    assert ex._speaks_for_itself(failure, 1) is None
    assert "node 2 reported for node 1" in (ex._speaks_for_itself(failure, 2) or "")
    assert "a client reported" in (ex._speaks_for_itself(failure, None) or "")
    assert ex._speaks_for_itself(m.Progress(1, 1, "accepted"), 0) is not None
    assert ex._speaks_for_itself(m.Finished(1, 1), 1) is None


class _Seat:
    """A store seat (``--store etcd://...``) that knows ``leader`` as the elected coordinator."""

    def __init__(self, leader: int | None) -> None:
        self.leader = leader

    def leader_rank(self) -> int | None:
        return self.leader


def test_with_a_store_the_elected_leader_drives_restarts_whatever_its_rank() -> None:
    ex = _executor(0, [0, 1, 2], {1: RUNNING, 2: RUNNING}, seat=_Seat(2))
    assert ex.may_coordinate(2) is None  # elected, though node 0 is the lowest live rank
    assert "node 1 is not the coordinator (node 2 is elected)" in (ex.may_coordinate(1) or "")
    assert ex.may_coordinate(0) is not None  # never orders from itself over the wire
    assert ex.may_coordinate(None) is not None
    # between two leaders (the old one's lease expired, the new one's key not yet seen): its
    # decisions are fenced in the store, so its orders are taken
    assert _executor(0, [0, 1, 2], {}, seat=_Seat(None)).may_coordinate(1) is None


async def test_the_node_running_a_restart_finishes_it_after_a_lower_node_rejoins() -> None:
    # node 0 was replaced; node 1 leads generation 6. Once the new node 0 took its Restart,
    # its heartbeat says "starting" and the view names node 0: node 1's Restart, GiveUp and
    # next attempt (Prepare 7) must still reach node 2, or the recovery never completes.
    import trio

    ex = _executor(2, [0, 1, 2, 3], {0: JOINING, 1: RUNNING, 3: RUNNING})
    ex.generation = 5
    async with trio.open_nursery() as nursery:
        ex._nursery = nursery

        async def prepared(_msg: object) -> None:
            return None

        ex._prepare = prepared  # type: ignore[method-assign,assignment]
        msg: Any = SimpleNamespace(body=m.Prepare(6), sender=1)
        assert ex.may_coordinate(1) is None
        await ex._on_prepare(msg)
    ex.generation = 6
    ctx: Any = ex.ctx
    ctx.membership._states[0] = ExecutorState.STARTING.value  # node 0's next heartbeat
    assert ex.may_coordinate(1) is None  # the restart, a give_up, the next attempt
    assert ex.may_coordinate(3) is not None  # nobody else
    ex.generation = 7  # a later generation, led by someone else: node 1 is a peer again
    assert "node 0 is" in (ex.may_coordinate(1) or "")


async def test_a_recover_request_never_holds_up_the_transport_reader(
    autojump_clock: object,
) -> None:
    # `recover` is open to client keys: forwarded to a coordinator that does not answer, it
    # must not stall the reader (heartbeats wait behind it: peers would be declared lost)
    import trio

    from supervise.cluster import DEFERRED

    ex = _executor(2, [0, 1, 2], {0: RUNNING, 1: RUNNING})
    replies: list[object] = []

    class _Silent:
        async def request(self, *_args: object, **_kw: object) -> object:
            await trio.sleep(60.0)  # the coordinator does not answer (within 30 s)
            raise RuntimeError("timed out")

        async def reply(self, _msg: object, body: object) -> None:
            replies.append(body)

    ctx: Any = ex.ctx
    ctx.transport = _Silent()
    msg: Any = SimpleNamespace(body=m.Recover(3), trace={}, sender=None, request_id=5)
    async with trio.open_nursery() as nursery:
        ex._nursery = nursery
        with trio.fail_after(1.0):
            assert await ex._on_recover(msg) is DEFERRED
            busy = await ex._on_recover(msg)  # a flood is declined, not queued
        assert isinstance(busy, m.RecoverReply) and not busy.accepted
    assert len(replies) == 1 and not replies[0].accepted  # type: ignore[attr-defined]
    assert "timed out" in replies[0].detail  # type: ignore[attr-defined]


def test_a_silent_rank_connection_is_given_up_by_the_time_the_node_is_lost() -> None:
    # a replacement for a node whose host crashed (its link never closed) speaks for its rank
    # once the old link was silent for cluster.peer_timeout, never later than 10 s
    from supervise.agents.node import transport_limits

    assert transport_limits(3.0).rebind_after == 3.0
    assert transport_limits(60.0).rebind_after == 10.0


async def test_a_one_way_recover_is_not_answered_and_breaks_nothing(
    autojump_clock: object,
) -> None:
    # a client may `send` a recover instead of asking: replying to it raised in the
    # executor's nursery (the node's tree) before the fix
    import trio

    ex = _executor(0, [0, 1], {1: RUNNING})
    ex.coordinator = None
    replies: list[object] = []

    class _Transport:
        async def reply(self, msg: Any, body: object) -> None:
            if not msg.request_id:
                raise ValueError("agent.recover was not a request: nothing to reply to")
            replies.append(body)

    ctx: Any = ex.ctx
    ctx.transport = _Transport()
    async with trio.open_nursery() as nursery:
        ex._nursery = nursery
        one_way: Any = SimpleNamespace(body=m.Recover(), trace={}, sender=None, request_id=0)
        await ex._on_recover(one_way)
    assert replies == [] and not ex._recovering
