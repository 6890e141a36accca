"""The farm's control plane in virtual time, on a fake network: placement, leases, fences,
pause/resume/cancel, retries with backoff, dead letter, coordinator handover, submit checks."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from supervise._testing.poll import wait_until_async
from supervise.cluster.errors import RequestTimeout
from supervise.tasks.control import FarmControl
from supervise.tasks.farm_messages import (
    RESULT_HOLD_MAX_S,
    STALE_FENCE,
    Ack,
    AttemptPhase,
    Control,
    ControlAction,
    FarmRefusal,
    Query,
    Renew,
    Renewed,
    ResultQuery,
    ResultReply,
    Submit,
    TableUpdate,
    TaskList,
    TaskReply,
    Update,
)
from supervise.tasks.resources import Resources
from supervise.tasks.spec import TaskSpec
from supervise.tasks.states import Reason, TaskState
from tests.tasks.farmkit import Farmlet, count_decodes, on_the_wire, unwrap

TARGET = "tests.tasks.taskfuncs:ticks"


async def submit(
    f: Farmlet, task_id: str, cpu: float = 1.0, to: int | None = None, **kw: Any
) -> Any:
    spec = TaskSpec(TARGET, (1,), task_id=task_id)
    msg = Submit(spec.to_bytes(), Resources(cpu).to_json(), **kw)
    peer = f.coordinator.rank if to is None else to
    return (await f.client().request(peer, msg)).body


async def ask(f: Farmlet, message: object) -> Any:
    return unwrap(await f.client().request(f.coordinator.rank, message))


async def info(f: Farmlet, task_id: str) -> dict[str, Any]:
    got = await ask(f, Query(task_id, history=True))
    assert isinstance(got, TaskList), got
    return got.tasks[0]


async def report(f: Farmlet, node: int, a: Any, phase: AttemptPhase, **kw: Any) -> Ack:
    u = Update(node, a.task_id, a.attempt, a.fence, phase, **kw)
    got = await f.links[node].request(f.coordinator.rank, u)
    return got.body


def assigned(f: Farmlet) -> list[tuple[int, Any]]:
    return [(r, a) for r, n in enumerate(f.nodes) for a, _ in n.assigned]


async def settle() -> None:
    await trio.sleep(1.0)  # a couple of the coordinator's rounds


async def test_placement_fills_offers_then_waits(autojump_clock: Any) -> None:
    f = Farmlet(2, cpu=2.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        for i in range(5):
            got = await submit(f, f"t{i}")
            assert isinstance(got, TaskReply) and got.info["state"] == "pending"
        await settle()
        placed = assigned(f)
        assert sorted(a.task_id for _, a in placed) == ["t0", "t1", "t2", "t3"]
        assert all(a.attempt == 1 and a.fetch_from == [] for _, a in placed)
        assert (await info(f, "t4"))["state"] == "pending"
        r, a = placed[0]
        await report(f, r, a, AttemptPhase.STARTED)
        ack = await report(f, r, a, AttemptPhase.COMPLETED, result=b"\x01")
        assert ack.ok
        await settle()
        assert "t4" in [a.task_id for _, a in assigned(f)]
        res = await ask(f, ResultQuery(a.task_id))
        assert isinstance(res, ResultReply) and res.state == "completed" and res.result == b"\x01"
        nursery.cancel_scope.cancel()


async def test_a_lease_not_renewed_requeues_to_the_replica_holder(autojump_clock: Any) -> None:
    f = Farmlet(3, lease_s=3.0, cpu=1.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t")
        await settle()
        [(r, a)] = assigned(f)
        await report(f, r, a, AttemptPhase.STARTED, replicas=[r, 2 if r != 2 else 1])
        for _ in range(3):  # renewed: the lease holds
            await trio.sleep(1.0)
            got = await f.links[r].request(0, Renew(r, [("t", a.fence)]))
            assert isinstance(got.body, Renewed) and got.body.stale == []
        assert len(assigned(f)) == 1
        await trio.sleep(5.0)  # silent past its lease (SIGSTOP): requeued elsewhere
        second = [x for x in assigned(f) if x[1].fence != a.fence]
        assert len(second) == 1
        r2, a2 = second[0]
        holder = 2 if r != 2 else 1
        assert r2 == holder and a2.attempt == 2 and a2.fence > a.fence
        assert a2.fetch_from == [holder]
        i = await info(f, "t")
        reasons = [h["reason"] for h in i["history"]]
        assert Reason.NODE_LOST in reasons and i["state"] == "assigned" and i["node"] == holder
        # the zombie wakes: its renew is told stale, its commit refused
        got = await f.links[r].request(0, Renew(r, [("t", a.fence)]))
        assert got.body.stale == ["t"]
        ack = await report(f, r, a, AttemptPhase.COMPLETED, result=b"z")
        assert not ack.ok and ack.reason == STALE_FENCE
        ack = await report(f, r2, a2, AttemptPhase.COMPLETED, result=b"ok")
        assert ack.ok
        res = await ask(f, ResultQuery("t"))
        assert res.result == b"ok"
        nursery.cancel_scope.cancel()


async def test_node_loss_requeues_without_spending_retries(autojump_clock: Any) -> None:
    f = Farmlet(3, cpu=1.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "a")
        await submit(f, "t", max_attempts=1)
        await settle()
        [(r, a)] = [x for x in assigned(f) if x[1].task_id == "t"]
        assert r != 0  # "a" is on the coordinator's node, "t" on another
        f.kill(r)
        await settle()
        [(r2, a2)] = [x for x in assigned(f) if x[1].fence != a.fence]
        assert r2 != r
        ack = await report(f, r2, a2, AttemptPhase.COMPLETED, result=b"")
        assert ack.ok
        i = await info(f, "t")
        assert i["state"] == "completed" and i["attempt"] == 2
        nursery.cancel_scope.cancel()


async def test_app_errors_retry_with_backoff_then_exhaust(autojump_clock: Any) -> None:
    f = Farmlet(1, cpu=1.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t", max_attempts=2)
        await settle()
        [(r, a)] = assigned(f)
        t0 = trio.current_time()
        await report(
            f, r, a, AttemptPhase.ERRORED, error="ValueError: x", error_mro=["builtins.ValueError"]
        )
        assert (await info(f, "t"))["state"] == "pending"
        await wait_until_async(lambda: len(assigned(f)) >= 2, what="the retry", timeout_s=30.0)
        assert trio.current_time() - t0 >= 0.5  # the default backoff's first delay
        a2 = assigned(f)[1][1]
        await report(
            f, r, a2, AttemptPhase.ERRORED, error="ValueError: y", error_mro=["builtins.ValueError"]
        )
        i = await info(f, "t")
        assert i["state"] == "failed" and i["reason"] == Reason.RETRIES_EXHAUSTED
        assert i["error"] == "ValueError: y"
        nursery.cancel_scope.cancel()


async def test_non_retryable_fails_at_once(autojump_clock: Any) -> None:
    f = Farmlet(1)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t", non_retryable=["builtins.KeyError"])
        await settle()
        [(r, a)] = assigned(f)
        await report(
            f, r, a, AttemptPhase.ERRORED, error="KeyError", error_mro=["builtins.KeyError"]
        )
        assert (await info(f, "t"))["reason"] == Reason.NON_RETRYABLE
        nursery.cancel_scope.cancel()


async def test_lost_too_often_is_dead_lettered(autojump_clock: Any) -> None:
    f = Farmlet(1, lease_s=1.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t")
        await trio.sleep(60.0)  # every attempt's lease runs out: lost, again and again
        i = await info(f, "t")
        assert i["state"] == "failed" and i["reason"] == Reason.DEAD_LETTER
        assert len(f.nodes[0].assigned) == 6  # max_losses (5) + 1
        nursery.cancel_scope.cancel()


async def test_pause_resume_cancel(autojump_clock: Any) -> None:
    f = Farmlet(2, cpu=1.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t")
        await settle()
        [(r, a)] = assigned(f)
        await report(f, r, a, AttemptPhase.STARTED)
        got = await ask(f, Control("t", ControlAction.PAUSE))
        assert got.info["state"] == "running" and got.info["stopping"] == "pause"
        await settle()
        assert [(s.task_id, s.fence, s.why) for s in f.nodes[r].stops] == [("t", a.fence, "pause")]
        await report(f, r, a, AttemptPhase.PAUSED, progress=0.5)
        i = await info(f, "t")
        assert i["state"] == "paused" and i["node"] is None
        await settle()
        assert len(assigned(f)) == 1  # a paused task is not placed
        got = await ask(f, Control("t", ControlAction.RESUME))
        assert got.info["state"] == "pending"
        await settle()
        r2, a2 = assigned(f)[1]
        assert a2.fence > a.fence and a2.attempt == 2
        got = await ask(f, Control("t", ControlAction.CANCEL))
        assert got.info["state"] == "cancelled"
        await settle()
        assert f.nodes[r2].stops[-1].why == "cancel"
        ack = await report(f, r2, a2, AttemptPhase.COMPLETED, result=b"")
        assert not ack.ok and ack.reason == STALE_FENCE
        bad = await ask(f, Control("t", ControlAction.RESUME))
        assert isinstance(bad, FarmRefusal) and "cancelled" in bad.reason
        unknown = await ask(f, Control("nope", ControlAction.CANCEL))
        assert isinstance(unknown, FarmRefusal) and unknown.unknown
        nursery.cancel_scope.cancel()


async def test_pending_pause_and_resume_before_the_pause_lands(autojump_clock: Any) -> None:
    f = Farmlet(1, cpu=1.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "a")
        await submit(f, "b")
        await settle()
        got = await ask(f, Control("b", ControlAction.PAUSE))  # pending -> paused at once
        assert got.info["state"] == "paused"
        [(r, a)] = assigned(f)
        await report(f, r, a, AttemptPhase.STARTED)
        await ask(f, Control("a", ControlAction.PAUSE))
        await ask(f, Control("a", ControlAction.RESUME))  # before the node confirmed
        await report(f, r, a, AttemptPhase.PAUSED)
        assert (await info(f, "a"))["state"] in ("pending", "assigned")
        nursery.cancel_scope.cancel()


async def test_submit_checks_and_redirect(autojump_clock: Any) -> None:
    f = Farmlet(2, cpu=4.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        bad = await submit(f, "big", cpu=64)
        assert isinstance(bad, FarmRefusal) and bad.unschedulable and "64" in bad.reason
        huge = TaskSpec(TARGET, ("x" * 60_000,), task_id="huge").to_bytes()
        msg = Submit(b"", Resources(1.0).to_json())
        got = unwrap(await f.client().request(0, msg, frames=[huge]))
        assert isinstance(got, FarmRefusal) and "at most" in got.reason
        redirect = await submit(f, "t", to=1)
        assert isinstance(redirect, FarmRefusal) and redirect.coordinator == 0
        first = await submit(f, "t")
        again = await submit(f, "t")  # idempotent by id
        assert first.info["id"] == again.info["id"] == "t"
        listed = await ask(f, Query())
        assert [t["id"] for t in listed.tasks] == ["t"]
        nursery.cancel_scope.cancel()


async def test_handover_loses_and_duplicates_nothing(autojump_clock: Any) -> None:
    f = Farmlet(3, cpu=2.0, lease_s=3.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        for i in range(10):
            await submit(f, f"t{i}")
        await settle()
        placed = assigned(f)
        assert len(placed) == 6
        done = [next(x for x in placed if x[0] == 0), next(x for x in placed if x[0] == 1)]
        rest = [x for x in placed if x not in done]
        for r, a in done:
            await report(f, r, a, AttemptPhase.COMPLETED, result=a.task_id.encode())
        running = [(r, a) for r, a in rest if r != 0]
        for r, a in running:
            await report(f, r, a, AttemptPhase.STARTED, progress=0.25)
        await ask(f, Control("t9", ControlAction.PAUSE))
        before = {t["id"]: (t["state"], t["fence"]) for t in (await ask(f, Query())).tasks}
        # the coordinator dies: rank 1 takes over from its replica
        f.kill(0)
        await settle()
        assert f.coordinator.rank == 1 and f.controls[1].leading
        after = {t["id"]: t for t in (await ask(f, Query(history=True))).tasks}
        assert sorted(after) == sorted(before) == [f"t{i}" for i in range(10)]
        for tid, (state, fence) in before.items():
            if state in ("completed", "paused", "running") and after[tid]["node"] != 0:
                assert (after[tid]["state"], after[tid]["fence"]) == (state, fence), tid
        # the running attempts on live nodes carry on under the new coordinator
        for r, a in running:
            got = await f.links[r].request(1, Renew(r, [(a.task_id, a.fence)]))
            assert got.body.stale == []
            ack = await report(f, r, a, AttemptPhase.COMPLETED, result=a.task_id.encode())
            assert ack.ok, ack
        # the tasks on node 0 went back to pending and were placed again on live nodes
        await trio.sleep(1.0)
        assert any(r == 0 for r, _ in rest)
        for r, a in rest:
            if r == 0:
                again = [
                    x for x in assigned(f) if x[1].task_id == a.task_id and x[1].fence > a.fence
                ]
                assert again and again[0][0] != 0
        res = await ask(f, ResultQuery(done[0][1].task_id))
        assert res.result == done[0][1].task_id.encode()
        # no task was placed twice at once: one live attempt per task
        live_attempts = [
            t for t in (await ask(f, Query())).tasks if t["state"] in ("assigned", "running")
        ]
        assert len({t["id"] for t in live_attempts}) == len(live_attempts)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_assigned_pause_or_cancel_tells_the_node(autojump_clock: Any, action: str) -> None:
    f = Farmlet(1)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t")
        await settle()
        [(r, _)] = assigned(f)
        got = await ask(f, Control("t", ControlAction(action)))
        assert got.info["state"] == ("paused" if action == "pause" else "cancelled")
        await settle()
        assert [s.why for s in f.nodes[r].stops] == [action]
        assert TaskState(got.info["state"]) in (TaskState.PAUSED, TaskState.CANCELLED)
        nursery.cancel_scope.cancel()


async def test_a_thousand_tiny_tasks_through_a_handover(autojump_clock: Any) -> None:
    """1,000 tasks through 3 nodes, the coordinator killed halfway: each completes exactly
    once, none is lost, none runs twice at once."""
    f = Farmlet(3, cpu=8.0, lease_s=3.0)
    results: dict[str, bytes] = {}
    done: set[tuple[str, int]] = set()

    async def work(rank: int) -> None:
        node = f.nodes[rank]
        seen = 0
        while True:
            await trio.sleep(0.1)
            if rank in f.net.down:
                return
            new, seen = node.assigned[seen:], len(node.assigned)
            for a, _ in new:
                while True:  # as a node does: again until the coordinator took it or refused
                    try:
                        ack = await report(
                            f, rank, a, AttemptPhase.COMPLETED, result=a.task_id.encode()
                        )
                    except RequestTimeout:
                        continue
                    if ack.ok or ack.reason == STALE_FENCE:
                        break
                    await trio.sleep(0.2)
                if ack.ok:
                    done.add((a.task_id, a.fence))
                    results[a.task_id] = a.task_id.encode()

    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        for r in range(3):
            nursery.start_soon(work, r)
        ids = [f"t{i:04d}" for i in range(1000)]
        for tid in ids[:500]:
            await submit(f, tid)
        await trio.sleep(0.5)
        f.kill(0)
        await trio.sleep(1.0)
        for tid in ids[500:]:
            got = await submit(f, tid)
            assert isinstance(got, TaskReply), got
        await wait_until_async(
            lambda: len(results) == 1000, what="every task completed", timeout_s=600.0
        )
        listed = (await ask(f, Query())).tasks
        assert sorted(t["id"] for t in listed) == ids
        assert {t["state"] for t in listed} == {"completed"}
        assert len({tid for tid, _ in done}) == 1000 == len(done)  # each completed once
        nursery.cancel_scope.cancel()


async def test_a_membership_change_is_handled_at_once(autojump_clock: Any) -> None:
    f = Farmlet(2, cpu=1.0)
    send, receive = trio.open_memory_channel[object](8)
    f.controls = [
        FarmControl(
            link,
            leader=f._leader,
            live=lambda: sorted(f.live),
            lease_s=1000.0,
            clock=trio.current_time,
            tick=60.0,
            changes=lambda: receive,
        )
        for link in f.links
    ]
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "a")
        await submit(f, "t")
        await trio.sleep(0.1)
        [(r, _)] = [x for x in assigned(f) if x[1].task_id == "t"]
        assert r == 1
        f.kill(1)
        await send.send("peer_down")  # membership's event: no wait for the next round
        await trio.sleep(0.1)
        i = await info(f, "t")
        assert i["state"] == "pending" and i["reason"] == Reason.NODE_LOST
        nursery.cancel_scope.cancel()


async def test_a_pause_not_delivered_is_sent_again(autojump_clock: Any) -> None:
    f = Farmlet(1)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t")
        await settle()
        [(r, a)] = assigned(f)
        await report(f, r, a, AttemptPhase.STARTED)
        f.nodes[r].drop_stops = 2
        await ask(f, Control("t", ControlAction.PAUSE))
        await wait_until_async(lambda: f.nodes[r].stops, what="the stop", timeout_s=30.0)
        assert [s.why for s in f.nodes[r].stops] == ["pause"]
        nursery.cancel_scope.cancel()


async def test_a_node_cannot_speak_for_another(autojump_clock: Any) -> None:
    f = Farmlet(3)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t")
        await settle()
        [(r, a)] = assigned(f)
        other = (r + 1) % 3
        forged = Update(r, "t", a.attempt, a.fence, AttemptPhase.COMPLETED, result=b"")
        ack = (await f.links[other].request(0, forged)).body
        assert not ack.ok
        got = await f.links[other].request(0, Renew(r, [("t", a.fence)]))
        assert not got.body.ok
        assert (await info(f, "t"))["state"] == "assigned"
        nursery.cancel_scope.cancel()


async def test_nothing_is_acted_on_before_a_peer_holds_it(autojump_clock: Any) -> None:
    f = Farmlet(2)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        f.net.down.add(1)  # rank 1 is silent but not yet declared lost
        answered: list[Any] = []

        async def submit_t() -> None:
            answered.append(await submit(f, "t"))

        nursery.start_soon(submit_t)
        await trio.sleep(2.0)  # (the client's request waits up to 5 s)
        assert answered == [] and assigned(f) == []  # neither acknowledged nor placed
        f.net.down.discard(1)
        await wait_until_async(lambda: answered, what="the reply", timeout_s=30.0)
        assert isinstance(answered[0], TaskReply)
        assert "t" in f.controls[1].table  # the replica has it
        nursery.cancel_scope.cancel()


async def test_a_frozen_coordinator_takes_the_newer_table_when_it_wakes(
    autojump_clock: Any,
) -> None:
    f = Farmlet(3, cpu=2.0, lease_s=3.0)
    frozen = trio.CancelScope()

    async def zero(task_status: trio.TaskStatus[None]) -> None:
        with frozen:  # cancelled: SIGSTOP (no round runs; its state stays as it was)
            await f.controls[0].run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(zero)
        for c in f.controls[1:]:
            await nursery.start(c.run)
        for r in range(3):
            await f.offer(r)
        await submit(f, "a")
        await submit(f, "b")
        await settle()
        [(r, a)] = [x for x in assigned(f) if x[1].task_id == "a"]
        assert r == 0
        frozen.cancel()
        f.kill(0)  # the others see it gone
        await settle()
        assert f.controls[1].leading and f.controls[0].leading  # it still believes it leads
        [(r2, a2)] = [x for x in assigned(f) if x[1].task_id == "a" and x[1].fence > a.fence]
        # SIGCONT: it is back, the lowest rank again, and knows it overslept
        f.live.add(0)
        f.net.down.discard(0)
        f.controls[0]._stalled = True
        await nursery.start(f.controls[0].run)
        await settle()
        assert f.controls[0].leading and not f.controls[1].leading
        rec = f.controls[0].table.get("a")
        assert (rec.fence, rec.node) == (a2.fence, r2)  # the newer table, not its own
        ack = await report(f, r2, a2, AttemptPhase.COMPLETED, result=b"ok")
        assert ack.ok, ack
        nursery.cancel_scope.cancel()


def test_the_fake_wire_bounds_headers_as_the_transport_does() -> None:
    """The fake network refuses what the real transport refuses: the tests below rely on it."""
    on_the_wire(TableUpdate(0, [b"x" * 1024]))
    with pytest.raises(ValueError, match="max_header_size"):
        on_the_wire(TableUpdate(0, [b"x" * (64 * 1024)]))


async def test_a_table_of_ten_thousand_tasks_is_served_saved_and_taken_over(
    autojump_clock: Any,
) -> None:
    """Every collection travels as payload or in bounded pages: a table of 10,000 tasks is
    replicated, listed and pulled by a new coordinator through a wire whose headers are
    bounded at 64 KiB, as the transport's are (a 1,000-task pull once stalled a farm)."""
    n = 10_000
    f = Farmlet(3, cpu=2.0, lease_s=3.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        coord = f.coordinator
        for i in range(n):
            spec = TaskSpec(TARGET, (i,), task_id=f"big{i:05d}")
            coord.table.submit(spec, Resources(1.0), 0.0)
        coord.poke()
        await wait_until_async(lambda: not coord.table.dirty, what="the table saved", timeout_s=600)
        assert len(f.controls[1].table) == len(f.controls[2].table) == n
        listed = await ask(f, Query())
        assert isinstance(listed, TaskList) and len(listed.tasks) == n
        f.kill(0)  # rank 1 takes over: it pulls rank 2's replica, page by page
        await wait_until_async(
            lambda: f.controls[1].leading and not f.controls[1].table.dirty,
            what="rank 1 leads with the table saved",
            timeout_s=600,
        )
        listed = await ask(f, Query())
        assert sorted(t["id"] for t in listed.tasks) == [f"big{i:05d}" for i in range(n)]
        assert len(f.controls[2].table) == n
        nursery.cancel_scope.cancel()


async def test_a_task_with_a_long_history_is_answered_as_payload(autojump_clock: Any) -> None:
    """A task's history (each retry's error) can outgrow a header: the reply to a control
    request carries it as payload, and the control plane never chokes on an answer."""
    f = Farmlet(2, cpu=2.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "long", max_attempts=60)
        for attempt in range(1, 41):
            r, a = await wait_until_async(
                lambda n=attempt: next(((r, a) for r, a in assigned(f) if a.attempt == n), None),
                what=f"attempt {attempt} assigned",
                timeout_s=3600,
            )
            ack = await report(f, r, a, AttemptPhase.ERRORED, error=f"{attempt}: " + "E" * 1900)
            assert ack.ok, ack
        got = await ask(f, Control("long", ControlAction.CANCEL))
        assert isinstance(got, TaskList), got  # the answer came as payload
        (task,) = got.tasks
        assert task["state"] == "cancelled" and len(task["history"]) > 80
        assert (await info(f, "long"))["state"] == "cancelled"
        nursery.cancel_scope.cancel()


async def test_a_live_node_late_to_renew_keeps_its_task_until_it_drops_it(
    autojump_clock: Any,
) -> None:
    """Node 1's renewals reach the coordinator 5 s late (its lease is 3 s) while its other
    reports arrive at once: the node lives, so its task keeps its lease — not moved, not
    counted lost (it used to be requeued as lost, and run again). Renewals that omit it (sent
    before the node took it, say) change nothing; once a renewal says the node dropped the
    attempt, the task moves."""
    f = Farmlet(2, cpu=2.0, lease_s=3.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await f.offer(0, cpu=0.5)  # no room on the coordinator's node: both go to node 1
        for tid in ("a", "b"):
            await submit(f, tid)
        await settle()
        on1 = {a.task_id: a for r, a in assigned(f) if r == 1}
        assert sorted(on1) == ["a", "b"]
        a, b = on1["a"], on1["b"]
        f.net.delays.delay[1, Renew] = 5.0

        async def renew(renewal: Renew) -> None:
            await f.links[1].request(0, renewal, timeout=30.0)

        for i in range(16):  # the renewals late (the last 4 omit a), b's progress on time
            held = (
                [(b.task_id, b.fence)] if i >= 12 else [(a.task_id, a.fence), (b.task_id, b.fence)]
            )
            nursery.start_soon(renew, Renew(1, held))
            assert (await report(f, 1, b, AttemptPhase.PROGRESS, progress=0.1)).ok
            await trio.sleep(1.0)
        rec = f.coordinator.table.get("a")
        assert (rec.state, rec.node, rec.attempt, rec.losses) == (TaskState.ASSIGNED, 1, 1, 0)
        nursery.start_soon(renew, Renew(1, [(b.task_id, b.fence)], [(a.task_id, a.fence)]))
        for _ in range(7):
            assert (await report(f, 1, b, AttemptPhase.PROGRESS, progress=0.2)).ok
            await trio.sleep(1.0)
        rec = f.coordinator.table.get("a")
        assert (rec.state, rec.losses) == (TaskState.PENDING, 1), rec.life.history
        assert "no longer runs it" in rec.life.history[-1].detail
        assert f.coordinator.table.get("b").losses == 0
        nursery.cancel_scope.cancel()


async def test_a_moved_task_whose_new_node_refuses_it_is_placed_again(
    autojump_clock: Any,
) -> None:
    """A task moved off a lost node, whose first new node refuses the assignment, is placed
    again within the same recovery trace (a retry in it): that used to stop the control
    plane (a recovery phase run twice)."""
    f = Farmlet(3, cpu=1.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "a")
        await submit(f, "t")
        await settle()
        [(r, _)] = [x for x in assigned(f) if x[1].task_id == "t"]
        assert r != 0
        other = 3 - r
        f.nodes[other].accept = False  # the only node with room refuses it
        f.kill(r)
        await wait_until_async(
            lambda: any(a.task_id == "t" for a, _ in f.nodes[other].assigned),
            what="t offered to the other node",
            timeout_s=60,
        )
        first = next(a for a, _ in f.nodes[0].assigned if a.task_id == "a")
        await report(f, 0, first, AttemptPhase.COMPLETED, result=b"")  # room on node 0 now
        await wait_until_async(
            lambda: any(a.task_id == "t" for a, _ in f.nodes[0].assigned),
            what="t placed on node 0",
            timeout_s=60,
        )
        assert (await info(f, "t"))["state"] == "assigned"  # the control plane still runs
        nursery.cancel_scope.cancel()


async def test_a_held_result_query_is_answered_at_its_wait(autojump_clock: Any) -> None:
    """A result query with a wait is held while its task runs: answered with the state then
    (the client asks again); an unknown task and a wait over the bound are refused at once."""
    f = Farmlet(3)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        await submit(f, "t")
        t0 = trio.current_time()
        res = await ask(f, ResultQuery("t", wait=2.0))
        assert isinstance(res, ResultReply) and res.state in ("assigned", "running")
        assert 2.0 <= trio.current_time() - t0 < 2.6
        refused = await ask(f, ResultQuery("nope", wait=2.0))
        assert isinstance(refused, FarmRefusal) and refused.unknown
        assert not f.coordinator._held
        with pytest.raises(ValueError, match="wait"):
            ResultQuery("t", wait=RESULT_HOLD_MAX_S + 1)
        nursery.cancel_scope.cancel()


async def test_a_follower_decodes_its_replica_only_when_it_reads_it(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Table updates cost a follower no record decoding, however many ticks pass; the new
    coordinator decodes the whole replica when it takes over."""
    decoded = count_decodes(monkeypatch)
    f = Farmlet(3)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        for i in range(5):
            await submit(f, f"t{i}")
        await trio.sleep(5.0)  # many rounds: placed, leases renewed, saved on the peers
        assert decoded == []
        f.kill(0)
        await wait_until_async(lambda: f.controls[1].leading, what="the takeover", timeout_s=30)
        assert len(f.controls[1].table) == 5
        assert len(decoded) >= 5
        nursery.cancel_scope.cancel()


async def test_a_dead_peer_not_yet_declared_lost_holds_up_no_save(autojump_clock: Any) -> None:
    """Node 2 dead but still counted live (its loss not declared yet): a save another peer took
    is acted on at once, not after the push to node 2 times out (a lost node's tasks moved
    only once that push ran out: seconds of every takeover)."""
    f = Farmlet(3, cpu=1.0)
    for control in f.controls:
        control._timeout = 30.0
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        f.net.down.add(2)  # dead; membership has not said so
        start = trio.current_time()
        got = await submit(f, "a")
        assert isinstance(got, TaskReply), got
        assert trio.current_time() - start < 1.0  # node 1 took the save: answered
        f.kill(1)  # now no live peer but the dead one: nothing is acted on
        with trio.move_on_after(3.0):
            await submit(f, "b")
            raise AssertionError("a save no live peer took was acted on")
        nursery.cancel_scope.cancel()


async def test_a_task_submitted_before_every_node_offered_waits_for_them(
    autojump_clock: Any,
) -> None:
    """Node 1 still starting (no offer yet) may be the node that fits: the task is taken and
    runs there once it offers; it was refused as unschedulable by node 0's offer alone."""
    f = Farmlet(2, cpu=1.0)
    async with trio.open_nursery() as nursery:
        for control in f.controls:
            await nursery.start(control.run)
        await f.offer(0)
        got = await submit(f, "big", cpu=2.0)
        assert isinstance(got, TaskReply), got
        await f.offer(1, cpu=4.0)
        await trio.sleep(1.0)
        assert [(r, a.task_id) for r, a in assigned(f)] == [(1, "big")]
        too_big = await submit(f, "huge", cpu=64)  # every live node offered: judged now
        assert isinstance(too_big, FarmRefusal) and too_big.unschedulable
        nursery.cancel_scope.cancel()
