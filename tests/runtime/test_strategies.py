"""Strategies, restart types, start/stop order (virtual time)."""

from __future__ import annotations

import pytest
import trio
from runtime_helpers import Journal, states, wait_for

import supervise as sv


async def test_children_start_in_order_and_stop_in_reverse(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor([sv.child(journal.worker(n), id=n) for n in "abc"])
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        assert journal.of("start") == ["a", "b", "c"]
        await ref.stop()
    assert journal.of("stop") == ["c", "b", "a"]


async def test_outside_cancellation_stops_children_in_reverse_order(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor([sv.child(journal.worker(n), id=n) for n in "abcd"])
    with trio.move_on_after(1) as scope:
        await sup.run()
    assert scope.cancelled_caught
    assert journal.of("stop") == ["d", "c", "b", "a"]


async def test_one_for_one_restarts_only_the_crashed_child(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(journal.worker("b", crash_after=1), id="b"),
            sv.child(journal.worker("c"), id="c"),
        ],
        max_restarts=100,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(2.5)  # b crashed at 1 and 2
        assert journal.count("start", "b") == 3
        assert journal.count("start", "a") == journal.count("start", "c") == 1
        info = {c.id: c for c in await ref.which_children()}
        assert info["b"].restarts == 2 and info["a"].restarts == 0
        await ref.stop()


async def test_one_for_all_restarts_everyone(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(journal.worker("b", crash_after=1), id="b"),
            sv.child(journal.worker("c"), id="c"),
        ],
        strategy="one_for_all",
        max_restarts=100,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(1.5)
        # the others stop in reverse order, then all start again in order
        assert journal.events[3:] == [
            ("stop", "b"),
            ("stop", "c"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
        ]
        assert {c.id: c.restarts for c in await ref.which_children()} == {"a": 1, "b": 1, "c": 1}
        await ref.stop()


async def test_rest_for_one_restarts_the_child_and_those_after_it(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(journal.worker("b", crash_after=1), id="b"),
            sv.child(journal.worker("c"), id="c"),
            sv.child(journal.worker("d"), id="d"),
        ],
        strategy=sv.Strategy.REST_FOR_ONE,
        max_restarts=100,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(1.5)
        assert journal.events[4:] == [
            ("stop", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        assert journal.count("start", "a") == 1
        await ref.stop()


async def test_transient_child_restarts_only_on_abnormal_exit(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    crashes = [True, True]

    async def transient() -> None:
        journal.events.append(("start", "t"))
        await trio.sleep(1)
        if crashes:
            crashes.pop()
            raise ValueError("boom")

    async def shutdown_child() -> None:
        journal.events.append(("start", "s"))
        raise sv.Shutdown("done")

    sup = sv.Supervisor(
        [
            sv.child(transient, id="t", restart="transient"),
            sv.child(shutdown_child, id="s", restart=sv.Restart.TRANSIENT),
        ],
        max_restarts=10,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(10)
        assert journal.count("start", "t") == 3  # two crashes restarted, then a normal exit
        assert journal.count("start", "s") == 1  # Shutdown is not abnormal
        assert await states(ref) == {"t": "stopped", "s": "stopped"}
        await ref.stop()


async def test_permanent_child_restarts_after_normal_exit(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor([sv.child(journal.worker("p", exit_after=1), id="p")], max_restarts=100)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(3.5)
        assert journal.count("start", "p") == 4
        await ref.stop()


async def test_temporary_child_is_never_restarted_and_forgotten(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("tmp", crash_after=1), id="tmp", restart="temporary"),
            sv.child(journal.worker("keep"), id="keep"),
        ],
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(2)
        assert journal.count("start", "tmp") == 1
        assert await states(ref) == {"keep": "running"}
        await ref.stop()


async def test_temporary_sibling_is_not_restarted_by_one_for_all(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("tmp"), id="tmp", restart="temporary"),
            sv.child(journal.worker("b", crash_after=1), id="b"),
        ],
        strategy="one_for_all",
        max_restarts=10,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(1.5)
        assert journal.count("stop", "tmp") == 1
        assert journal.count("start", "tmp") == 1
        assert await states(ref) == {"b": "running"}
        await ref.stop()


async def test_one_for_all_also_restarts_stopped_siblings(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    """As OTP: a group restart starts every non-temporary child of the group."""
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("done", exit_after=0.5), id="done", restart="transient"),
            sv.child(journal.worker("b", crash_after=1), id="b"),
        ],
        strategy="one_for_all",
        max_restarts=10,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(0.7)
        assert await states(ref) == {"done": "stopped", "b": "running"}
        await trio.sleep(0.5)
        assert journal.count("start", "done") == 2
        await ref.stop()


async def test_async_function_with_task_status_is_started_when_it_says_so(
    autojump_clock: trio.abc.Clock,
) -> None:
    order: list[str] = []

    async def slow_start(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(3)
        order.append("first ready")
        task_status.started("handle")
        await trio.sleep_forever()

    async def second() -> None:
        order.append("second started")
        await trio.sleep_forever()

    sup = sv.Supervisor([sv.child(slow_start, id="slow"), sv.child(second, id="second")])
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        assert order == ["first ready", "second started"]
        [slow, _] = await ref.which_children()
        assert slow.ref == "handle"
        await ref.stop()


async def test_args_and_kwargs_reach_the_target(autojump_clock: trio.abc.Clock) -> None:
    got: list[object] = []

    async def target(a: int, b: int, *, c: int) -> None:
        got.append((a, b, c))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(target, 1, 2, id="t", c=3)]).run)
        assert got == [(1, 2, 3)]
        await ref.stop()


async def test_run_without_start_returns_after_stop(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [sv.child(journal.worker("a"), id="a")],
    )

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        nursery.start_soon(ref.stop)
    assert not ref.alive
    with pytest.raises(sv.NoProc):
        await ref.which_children()


async def test_a_failing_initial_start_stops_the_started_children(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    class Broken(sv.Server):
        async def init(self) -> None:
            raise OSError("no database")

    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(Broken, id="db"),
            sv.child(journal.worker("c"), id="c"),
        ]
    )
    async with trio.open_nursery() as nursery:
        with pytest.raises(sv.StartFailed, match="'db' failed to start") as info:
            await nursery.start(sup.run)
    assert isinstance(info.value.__cause__, OSError)
    assert journal.events == [("start", "a"), ("stop", "a")]


async def test_wait_for_helper_detects_never(autojump_clock: trio.abc.Clock) -> None:
    with pytest.raises(AssertionError):
        await wait_for(lambda: False, limit=3)


async def test_a_task_status_child_that_returns_before_started_fails_to_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def never_ready(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.sleep(1)

    with pytest.raises(sv.StartFailed, match="exited \\(normal\\) before it reported started"):
        await sv.Supervisor([sv.child(never_ready, id="n")]).run()
