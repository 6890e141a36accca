"""Restart intensity (window edges), GaveUp, nested escalation, failed restarts, backoff."""

from __future__ import annotations

import itertools

import pytest
import trio
from runtime_helpers import Journal, states

import supervise as sv


def crash_at(times: list[float], journal: Journal, name: str = "w"):  # type: ignore[no-untyped-def]
    """A child that crashes at the given absolute virtual times (one per incarnation)."""
    schedule = list(times)

    async def run() -> None:
        journal.events.append(("start", name))
        if schedule:
            await trio.sleep_until(schedule.pop(0))
            raise RuntimeError(f"crash at {trio.current_time():g}")
        await trio.sleep_forever()

    return run


async def run_until_gave_up(sup: sv.Supervisor, horizon: float) -> tuple[sv.GaveUp | None, float]:
    with trio.move_on_after(horizon):
        try:
            await sup.run()
        except sv.GaveUp as exc:
            return exc, trio.current_time()
    return None, trio.current_time()


@pytest.mark.parametrize(("last_crash", "gives_up"), [(5.0, True), (5.001, False)])
async def test_window_edge(
    last_crash: float, gives_up: bool, journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    """3 restarts allowed in 5 s: a 4th restart exactly 5 s after the first still counts."""
    start = trio.current_time()
    times = [start + t for t in (0.0, 1.0, 2.0, last_crash)]
    sup = sv.Supervisor(
        [sv.child(crash_at(times, journal), id="w")], max_restarts=3, max_seconds=5.0
    )
    err, _ = await run_until_gave_up(sup, horizon=100)
    assert (err is not None) is gives_up
    assert journal.count("start", "w") == (4 if gives_up else 5)


async def test_more_than_max_restarts_gives_up_chained_to_the_failure(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("other"), id="other"),
            sv.child(journal.worker("bad", crash_after=0.1, exc=KeyError), id="bad"),
        ],
        max_restarts=2,
        max_seconds=10,
    )
    err, _ = await run_until_gave_up(sup, horizon=100)
    assert err is not None
    assert isinstance(err.__cause__, KeyError)
    assert err.child_id == "bad" and err.reason.abnormal
    assert "more than 2 restarts within 10 s" in str(err)
    assert journal.count("start", "bad") == 3
    assert journal.events[-2:] == [("stop", "bad"), ("stop", "other")]


async def test_zero_intensity_gives_up_at_the_first_restart(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor([sv.child(journal.worker("w", exit_after=1), id="w")], max_restarts=0)
    err, _ = await run_until_gave_up(sup, horizon=100)
    assert err is not None
    assert isinstance(err.__cause__, sv.ChildFailed)  # a normal exit has no exception of its own
    assert journal.count("start", "w") == 1


async def test_restarts_spread_out_never_give_up(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    # a crash every 3 s: never more than 2 restarts in any 5 s window
    sup = sv.Supervisor(
        [sv.child(journal.worker("w", crash_after=3.0), id="w")], max_restarts=2, max_seconds=5
    )
    err, _ = await run_until_gave_up(sup, horizon=59)
    assert err is None
    assert journal.count("start", "w") == 20


async def test_nested_supervisor_escalates_to_its_parent(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    inner = sv.Supervisor(
        [sv.child(journal.worker("leaf", crash_after=0.1), id="leaf")],
        max_restarts=1,
        max_seconds=5,
    )
    outer = sv.Supervisor(
        [sv.child(journal.worker("sibling"), id="sibling"), sv.child(inner, id="inner")],
        max_restarts=1,
        max_seconds=5,
    )
    err, _ = await run_until_gave_up(outer, horizon=100)
    assert err is not None and err.child_id == "inner"
    inner_err = err.__cause__
    assert isinstance(inner_err, sv.GaveUp) and inner_err.supervisor == "root/inner"
    assert isinstance(inner_err.__cause__, RuntimeError)
    # inner gave up twice (restarted once by outer), each time after 2 leaf starts
    assert journal.count("start", "leaf") == 4
    assert journal.count("start", "sibling") == 1


async def test_nested_supervisor_is_restarted_by_its_parent(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    inner = sv.Supervisor(
        [sv.child(journal.worker("leaf", crash_after=1), id="leaf")], max_restarts=0
    )
    outer = sv.Supervisor([sv.child(inner, id="inner")], max_restarts=10, max_seconds=100)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(outer.run)
        await trio.sleep(3.5)
        [info] = await ref.which_children()
        assert info.kind == "supervisor" and info.restarts == 3
        assert isinstance(info.ref, sv.SupervisorRef) and info.ref.path == "root/inner"
        assert await states(info.ref) == {"leaf": "running"}
        await ref.stop()


async def test_failed_restart_counts_and_is_retried(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    """A server whose init fails on restart is retried; every attempt counts toward intensity."""
    attempts: list[float] = []

    class Flaky(sv.Server):
        async def init(self, fail_from: int, fail_until: int) -> None:
            attempts.append(trio.current_time())
            if fail_from <= len(attempts) <= fail_until:
                raise ConnectionError("backend down")

        def handle_call(self, request: object) -> object:
            raise RuntimeError("crash")

    sup = sv.Supervisor([sv.child(Flaky, 2, 3, id="f", name="f")], max_restarts=5, max_seconds=10)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        with pytest.raises(RuntimeError):
            await sv.whereis("f").call("x")  # type: ignore[union-attr]
        await trio.sleep(0.1)
        assert len(attempts) == 4  # 2 and 3 failed to start, 4 came up
        assert sv.whereis("f") is not None
        assert (await ref.which_children())[0].restarts == 3
        await ref.stop()


async def test_failed_restarts_exhaust_intensity(autojump_clock: trio.abc.Clock) -> None:
    attempts: list[float] = []

    class Flaky(sv.Server):
        async def init(self) -> None:
            attempts.append(trio.current_time())
            if len(attempts) > 1:
                raise ConnectionError("backend down")

        def handle_call(self, request: object) -> object:
            raise RuntimeError("crash")

    sup = sv.Supervisor([sv.child(Flaky, id="f", name="g")], max_restarts=5, max_seconds=10)
    with pytest.RaisesGroup(sv.GaveUp) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            with pytest.raises(RuntimeError):
                await sv.whereis("g").call("x")  # type: ignore[union-attr]
            await trio.sleep_forever()
    gave_up = info.value.exceptions[0]
    assert len(attempts) == 6  # the first run + 5 restarts; asking for a 6th gives up
    assert isinstance(gave_up.__cause__, ConnectionError)


async def test_backoff_sequence_between_restarts(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    backoff = sv.Backoff(initial=1.0, max=8.0, multiplier=2.0)
    sup = sv.Supervisor(
        [sv.child(journal.worker("w", crash_after=0), id="w")],
        max_restarts=100,
        max_seconds=1000,
        backoff=backoff,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(40)
        starts = journal.starts["w"]
        gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
        assert gaps[:6] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
        await ref.stop()


async def test_backoff_state_is_restarting_and_terminate_cancels_it(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [sv.child(journal.worker("w", crash_after=1), id="w")],
        backoff=sv.Backoff(initial=30.0, max=30.0),
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(2)
        assert await states(ref) == {"w": "restarting"}
        await ref.terminate_child("w")
        assert await states(ref) == {"w": "stopped"}
        await trio.sleep(60)
        assert journal.count("start", "w") == 1
        await ref.stop()


async def test_backoff_resets_after_a_stable_run(autojump_clock: trio.abc.Clock) -> None:
    starts: list[float] = []
    lifetimes = [0.0, 0.0, 0.0, 20.0, 0.0, 0.0]

    async def worker() -> None:
        starts.append(trio.current_time())
        await trio.sleep(lifetimes.pop(0) if lifetimes else 1000)
        raise RuntimeError("crash")

    backoff = sv.Backoff(initial=1.0, max=100.0, reset_after=10.0)
    sup = sv.Supervisor(
        [sv.child(worker, id="w")], max_restarts=100, max_seconds=1000, backoff=backoff
    )
    with trio.move_on_after(100):
        await sup.run()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
    # 1, 2, 4; then it ran 20 s (>= reset_after), so the count starts over: 1, 2, 4
    assert gaps == [1.0, 2.0, 4.0, 20.0 + 1.0, 2.0, 4.0]


async def test_backoff_applies_to_group_restarts(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(journal.worker("b", crash_after=0), id="b"),
        ],
        strategy="one_for_all",
        max_restarts=100,
        max_seconds=1000,
        backoff=sv.Backoff(initial=1.0, max=4.0),
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(12)
        starts = journal.starts["a"]
        gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts)]
        assert gaps[:4] == [1.0, 2.0, 4.0, 4.0]
        await ref.stop()


async def test_backoff_jitter_stays_within_bounds(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [sv.child(journal.worker("w", crash_after=0), id="w")],
        max_restarts=1000,
        max_seconds=1,
        backoff=sv.Backoff(initial=2.0, max=2.0, jitter=0.5),
    )
    with trio.move_on_after(200):
        await sup.run()
    starts = journal.starts["w"]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) > 50
    assert all(1.0 <= g <= 3.0 for g in gaps)
    assert max(gaps) - min(gaps) > 0.5  # actually jittered


async def test_group_restart_retries_a_sibling_that_fails_to_start(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    inits: list[float] = []

    class FailsOnce(sv.Server):
        async def init(self) -> None:
            inits.append(trio.current_time())
            if len(inits) == 2:  # the first restart attempt fails
                raise ConnectionError("not yet")

    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(FailsOnce, id="srv"),
            sv.child(journal.worker("b", crash_after=1), id="b"),
        ],
        strategy="one_for_all",
        max_restarts=10,
        max_seconds=100,
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(1.5)
        assert len(inits) == 3  # initial, failed restart, retried restart
        # a was started three times: initially, by the restart that failed at srv, by the retry
        assert journal.count("start", "a") == 3
        assert journal.count("start", "b") == 2  # the failed attempt never reached b
        assert await states(ref) == {"a": "running", "srv": "running", "b": "running"}
        await ref.stop()


async def test_outside_cancel_during_the_initial_start_stops_what_started(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    class SlowInit(sv.Server):
        async def init(self) -> None:
            await trio.sleep(100)

    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(SlowInit, id="slow"),
            sv.child(journal.worker("c"), id="c"),
        ]
    )
    with trio.move_on_after(1) as scope:
        await sup.run()
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(1.0)
    assert journal.events == [("start", "a"), ("stop", "a")]


async def test_stop_during_a_long_group_backoff_is_prompt(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(journal.worker("b", crash_after=1), id="b"),
        ],
        strategy="one_for_all",
        backoff=sv.Backoff(initial=60.0, max=60.0),
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(2)
        assert await states(ref) == {"a": "restarting", "b": "restarting"}
        t0 = trio.current_time()
        await ref.stop()
        assert trio.current_time() - t0 < 1
    assert journal.count("start", "a") == 1


async def test_group_restart_gives_up_when_a_sibling_never_starts_again(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    inits: list[float] = []

    class OnlyOnce(sv.Server):
        async def init(self) -> None:
            inits.append(trio.current_time())
            if len(inits) > 1:
                raise ConnectionError("gone for good")

    sup = sv.Supervisor(
        [sv.child(OnlyOnce, id="srv"), sv.child(journal.worker("b", crash_after=1), id="b")],
        strategy="one_for_all",
        max_restarts=3,
        max_seconds=100,
    )
    with pytest.raises(sv.GaveUp) as info:
        await sup.run()
    # b's crash is restart 1; then srv fails to start at restarts 2 and 3; the 4th gives up
    assert len(inits) == 4
    assert journal.count("start", "b") == 1
    assert info.value.child_id == "srv"
    assert isinstance(info.value.__cause__, ConnectionError)


async def test_siblings_that_die_together_are_one_restart(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    """As OTP: exits of group members that die before the supervisor stops them are part of
    the failure being handled, not failures of their own (ranks of one job crash together).
    (rest_for_one depends on which exit comes first: see the next test.)"""
    crash = trio.Event()

    def rank(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            journal.events.append(("start", name))
            if journal.count("start", name) == 1:
                await crash.wait()
                raise RuntimeError(f"{name} lost its peers")
            await trio.sleep_forever()

        return run

    sup = sv.Supervisor(
        [sv.child(rank(n), id=n) for n in "abc"], strategy="one_for_all", max_restarts=1
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        crash.set()
        await trio.sleep(1)
        assert await states(ref) == {"a": "running", "b": "running", "c": "running"}
        assert {c.id: c.restarts for c in await ref.which_children()} == {"a": 1, "b": 1, "c": 1}
        await ref.stop()


@pytest.mark.parametrize(("first", "second", "gives_up"), [("b", "c", False), ("c", "b", True)])
async def test_rest_for_one_exits_while_a_restart_is_pending(
    first: str, second: str, gives_up: bool, journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    """Exits queued while the supervisor is busy: a later sibling of the failed child is part of
    its group (one restart); an earlier one is a failure of its own (a second restart)."""
    crash_at = {first: 0.5, second: 1.0}

    def worker(name: str):  # type: ignore[no-untyped-def]
        async def run() -> None:
            journal.events.append(("start", name))
            if journal.count("start", name) == 1 and name in crash_at:
                await trio.sleep(crash_at[name])
                raise RuntimeError(f"{name} crashed")
            await trio.sleep_forever()

        return run

    async def slow_to_stop() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(2)

    sup = sv.Supervisor(
        [
            *(sv.child(worker(n), id=n) for n in "abc"),
            sv.child(slow_to_stop, id="slow", restart="temporary"),
        ],
        strategy="rest_for_one",
        max_restarts=1,
    )

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(sup.run)
            await ref.terminate_child("slow")  # busy for 2 s: both crashes queue up meanwhile
            await trio.sleep(1)
            assert await states(ref) == {"a": "running", "b": "running", "c": "running"}
            assert {c.id: c.restarts for c in await ref.which_children()} == {
                "a": 0,
                "b": 1,
                "c": 1,
            }
            await ref.stop()

    if gives_up:
        with pytest.RaisesGroup(sv.GaveUp) as info:
            await scenario()
        assert info.value.exceptions[0].child_id == "b"
    else:
        await scenario()
