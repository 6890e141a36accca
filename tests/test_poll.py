"""The one polling helper (``supervise._testing.poll``): a condition, a deadline, and a timeout
that says what was awaited."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from supervise._testing import WaitTimeout, wait_until, wait_until_async


def test_returns_the_conditions_first_truthy_value() -> None:
    calls = itertools.count()
    assert wait_until(lambda: next(calls) >= 3 and "ready", what="x", timeout_s=5) == "ready"


def test_a_timeout_names_what_was_awaited_and_the_state() -> None:
    with pytest.raises(WaitTimeout) as exc:
        wait_until(
            lambda: False,
            what="node 1 to resume",
            timeout_s=0.05,
            interval_s=0.01,
            details=lambda: "node 1 log: nothing",
        )
    assert (
        str(exc.value) == "timed out after 0.05 s waiting for node 1 to resume\nnode 1 log: nothing"
    )
    assert isinstance(exc.value, TimeoutError) and exc.value.what == "node 1 to resume"


def test_a_failing_description_keeps_the_timeout() -> None:
    with pytest.raises(WaitTimeout, match="describing the state failed"):
        wait_until(lambda: None, what="x", timeout_s=0.01, details=lambda: 1 / 0)  # type: ignore[arg-type,return-value]


def test_an_error_in_the_condition_ends_the_wait() -> None:
    def boom() -> bool:
        raise RuntimeError("the node exited")

    with pytest.raises(RuntimeError, match="the node exited"):
        wait_until(boom, what="x", timeout_s=60)


async def test_async_wait_is_woken_by_its_event(autojump_clock: trio.testing.MockClock) -> None:
    state = {"done": False, "changed": trio.Event()}

    def fresh() -> trio.Event:
        state["changed"] = trio.Event()
        return state["changed"]  # type: ignore[return-value]

    async def change() -> None:
        await trio.sleep(1.0)
        state["done"] = True
        state["changed"].set()  # type: ignore[union-attr]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(change)
        start = trio.current_time()
        await wait_until_async(
            lambda: state["done"], what="x", timeout_s=100, interval_s=50, wake=fresh
        )
    assert trio.current_time() - start == pytest.approx(1.0)  # not the 50 s interval


async def test_async_timeout(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(WaitTimeout, match="waiting for the spans"):
        await wait_until_async(lambda: [], what="the spans", timeout_s=3)


async def test_an_async_condition_is_awaited(autojump_clock: trio.testing.MockClock) -> None:
    asked = itertools.count(1)

    async def ask() -> str | None:
        await trio.sleep(0.5)  # a request to another process
        return "ok" if next(asked) >= 3 else None

    assert await wait_until_async(ask, what="x", timeout_s=10, interval_s=1) == "ok"


async def test_a_hanging_async_condition_still_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never() -> bool:
        await trio.sleep_forever()
        return True

    start = trio.current_time()
    with pytest.raises(WaitTimeout, match="waiting for the reply"):
        await wait_until_async(never, what="the reply", timeout_s=3)
    assert trio.current_time() - start == pytest.approx(3.0)
