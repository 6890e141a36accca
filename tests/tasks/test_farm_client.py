"""`supervise.tasks.Farm` against the control plane on a fake network, in virtual time: the
coordinator found by asking nodes and following redirects, a takeover waited out, results,
refusals as the documented exceptions."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from supervise._validation import InvalidValue
from supervise.tasks import (
    BadTarget,
    Farm,
    FarmError,
    TaskCancelled,
    TaskFailed,
    TaskState,
    Unschedulable,
    UnsupportedValue,
    encode,
)
from supervise.tasks.farm_messages import AttemptPhase, Submit, Update
from supervise.tasks.spec import TaskSpec
from tests.tasks.farmkit import FakeWire, Farmlet

TARGET = "tests.tasks.taskfuncs:ticks"


def client(f: Farmlet, timeout: float = 10.0) -> Farm:
    farm = Farm(nodes=[f"127.0.0.1:{7000 + r}" for r in range(f.n)], timeout=timeout)
    farm._transport = FakeWire(f.net, None)  # the fake network instead of zmq
    return farm


async def finish(f: Farmlet, task_id: str, phase: AttemptPhase, **kw: Any) -> None:
    r, a = next(
        (r, a) for r, n in enumerate(f.nodes) for a, _ in n.assigned if a.task_id == task_id
    )
    u = Update(r, task_id, a.attempt, a.fence, phase, **kw)
    await f.links[r].request(f.coordinator.rank, u)


async def test_submit_result_show_list(autojump_clock: Any) -> None:
    f = Farmlet(3)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        farm = client(f)
        ref = await farm.submit(TARGET, 3, cpu=0.5, memory="1M", task_id="t1")
        assert ref.task_id == "t1"
        with pytest.raises(FarmError, match=r"is (pending|assigned)"):
            await farm.result("t1", wait=False)
        await trio.sleep(1.0)
        info = await ref.show()
        assert info.state is TaskState.ASSIGNED and info.attempt == 1
        assert info.to_json()["id"] == "t1" and info.needs.memory == 1_000_000
        await finish(f, "t1", AttemptPhase.COMPLETED, result=encode({"n": 3}))
        assert await ref.result(timeout=5) == {"n": 3}
        assert [i.id for i in await farm.list()] == ["t1"]
        with pytest.raises(TimeoutError):
            await (await farm.submit(TARGET, 1)).result(timeout=2.0)
        nursery.cancel_scope.cancel()


async def test_failed_cancelled_unknown_unschedulable(autojump_clock: Any) -> None:
    f = Farmlet(2, cpu=2.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        farm = client(f)
        with pytest.raises(Unschedulable, match="64"):
            await farm.submit(TARGET, 1, cpu=64)
        with pytest.raises(BadTarget):
            await farm.submit("not a target", 1)
        with pytest.raises(UnsupportedValue):
            await farm.submit(TARGET, object())
        with pytest.raises(FarmError, match="no task 'nope'"):
            await farm.show("nope")
        ref = await farm.submit(TARGET, 1, max_attempts=1, task_id="f")
        await trio.sleep(1.0)
        await finish(f, "f", AttemptPhase.ERRORED, error="RuntimeError: boom")
        with pytest.raises(TaskFailed, match="boom"):
            await ref.result()
        c = await farm.submit(TARGET, 1)
        info = await c.cancel()
        assert info.state is TaskState.CANCELLED
        with pytest.raises(TaskCancelled):
            await c.result()
        p = await farm.submit(TARGET, 1)
        assert (await p.pause()).state is TaskState.PAUSED
        assert (await p.resume()).state is TaskState.PENDING
        nursery.cancel_scope.cancel()


async def test_redirects_and_waits_out_a_takeover(autojump_clock: Any) -> None:
    f = Farmlet(3)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        farm = client(f)
        farm._guess = 2  # asks a follower first: redirected to rank 0
        ref = await farm.submit(TARGET, 1, task_id="t")
        assert farm._guess == 0
        f.kill(0)  # the coordinator dies; the client finds rank 1 once it took over
        info = await ref.show()
        assert info.id == "t" and farm._guess == 1
        nursery.cancel_scope.cancel()


async def test_no_nodes_is_one_line() -> None:
    with pytest.raises(FarmError, match="no farm nodes"):
        Farm(nodes="")
    with pytest.raises(FarmError, match="async with"):
        await Farm(nodes="127.0.0.1:1").list()


async def test_large_lists_and_results_travel_as_payload(autojump_clock: Any) -> None:
    f = Farmlet(2, cpu=64.0)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        farm = client(f)
        with pytest.raises(InvalidValue, match="at most 48 KiB"):  # an assignment carries it
            await farm.submit(TARGET, "x" * 60_000)
        mid = "y" * 30_000  # over the inline size: the submit's payload carries it
        ref = await farm.submit(TARGET, mid, task_id="mid")
        for i in range(200):  # a list far over a message header's 64 KiB
            await farm.submit(TARGET, i, task_id=f"t{i:03d}")
        assert len(await farm.list()) == 201
        await trio.sleep(1.0)
        big = "x" * 100_000
        await finish(f, "mid", AttemptPhase.COMPLETED, result=encode([big, big]))
        assert await ref.result(timeout=5) == [big, big]
        spec = TaskSpec(TARGET, (mid,), task_id="mid").to_bytes()
        assert f.controls[0].table.get("mid").spec == spec
        nursery.cancel_scope.cancel()


async def test_a_slow_coordinator_is_waited_for_and_a_submit_asked_again_is_one_task(
    autojump_clock: Any,
) -> None:
    """A loaded coordinator answers a submit after 4 s: the client waits for it within its
    timeout (it used to give up each request after 2 s, asking again until it failed), and
    a submit asked again (the answer lost) names the same task: never a second one."""
    f = Farmlet(2)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        f.net.delays.delay[None, Submit] = 4.0
        farm = client(f, timeout=30.0)
        ref = await farm.submit(TARGET, 1, cpu=0.5)
        assert len(f.coordinator.table) == 1
        # the same submit again (as after a lost answer): the same task, nothing added
        spec = f.coordinator.table.get(ref.task_id).spec
        again = await farm._call(Submit(spec, {"cpu": 0.5, "memory": 0, "gpus": 0}))
        assert again.body.info["id"] == ref.task_id
        assert len(f.coordinator.table) == 1
        nursery.cancel_scope.cancel()


async def test_a_result_comes_when_the_task_ends_not_at_the_next_poll(autojump_clock: Any) -> None:
    """The coordinator holds a result query until its task ends (its end saved on a peer), so
    a client waiting for long learns the result at once, not up to a poll interval later."""
    f = Farmlet(3)
    async with trio.open_nursery() as nursery:
        await f.start(nursery)
        farm = client(f)
        await farm.submit(TARGET, 3, cpu=0.5, task_id="t1")
        got: list[float] = []

        async def waiter() -> None:
            assert await farm.result("t1", timeout=30) == 7
            got.append(trio.current_time())

        nursery.start_soon(waiter)
        await trio.sleep(1.7)  # within the lease; a poll backing off would come 0.8 s later
        done = trio.current_time()
        await finish(f, "t1", AttemptPhase.COMPLETED, result=encode(7))
        await trio.sleep(2.0)
        assert got and got[0] - done < 0.1, got[0] - done
        nursery.cancel_scope.cancel()
