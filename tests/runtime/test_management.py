"""SupervisorRef management API and its OTP error cases; DynamicSupervisor; auto_shutdown."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
from runtime_helpers import Journal, states
from structlog.testing import capture_logs

import supervise as sv


def shielded_cleanup(seconds: float) -> Callable[[], Awaitable[None]]:
    """A child that runs until cancelled, then spends ``seconds`` in shielded cleanup."""

    async def child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(seconds)

    return child


async def test_which_and_count_children(journal: Journal, autojump_clock: trio.abc.Clock) -> None:
    inner = sv.Supervisor([sv.child(journal.worker("leaf"), id="leaf")])
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("a"), id="a"),
            sv.child(inner, id="inner"),
            sv.child(journal.worker("b", exit_after=1), id="b", restart="transient"),
        ]
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        children = await ref.which_children()
        assert [(c.id, c.state, c.kind) for c in children] == [
            ("a", sv.ChildState.RUNNING, "worker"),
            ("inner", "running", "supervisor"),
            ("b", "running", "worker"),
        ]
        assert await ref.count_children() == sv.ChildCounts(
            specs=3, active=3, supervisors=1, workers=2
        )
        await trio.sleep(2)
        assert await ref.count_children() == sv.ChildCounts(
            specs=3, active=2, supervisors=1, workers=2
        )
        await ref.stop()


async def test_terminate_then_restart_then_delete(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [sv.child(journal.worker("a"), id="a"), sv.child(journal.worker("b"), id="b")]
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await ref.terminate_child("a")
        assert journal.of("stop") == ["a"]
        assert await states(ref) == {"a": "stopped", "b": "running"}
        await ref.terminate_child("a")  # already stopped: fine, as OTP
        assert (await ref.child_spec("a")).id == "a"

        info = await ref.restart_child("a")
        assert info.state is sv.ChildState.RUNNING and info.restarts == 1
        assert journal.count("start", "a") == 2

        with pytest.raises(sv.AlreadyRunning, match="'a' is already running"):
            await ref.restart_child("a")
        with pytest.raises(sv.StillRunning, match="terminate_child it first"):
            await ref.delete_child("a")
        await ref.terminate_child("a")
        await ref.delete_child("a")
        assert await states(ref) == {"b": "running"}
        for op in (ref.terminate_child, ref.restart_child, ref.delete_child, ref.child_spec):
            with pytest.raises(sv.NotFound, match="no child with id 'a'"):
                await op("a")
        await ref.stop()


async def test_restart_and_delete_refuse_a_child_waiting_out_its_backoff(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def crash() -> None:
        await trio.sleep(1)
        raise RuntimeError("boom")

    sup = sv.Supervisor(
        [sv.child(crash, id="c")],
        max_restarts=10,
        max_seconds=1000,
        backoff=sv.Backoff(initial=30.0, max=30.0),
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await trio.sleep(2)  # crashed after 1 s: now 30 s of backoff before its restart
        assert await states(ref) == {"c": "restarting"}
        with pytest.raises(sv.AlreadyRunning, match="'c' is already restarting"):
            await ref.restart_child("c")
        with pytest.raises(sv.StillRunning, match="'c' is still restarting: terminate_child"):
            await ref.delete_child("c")
        await ref.terminate_child("c")  # a restarting child can be terminated, then deleted
        assert await states(ref) == {"c": "stopped"}
        await ref.delete_child("c")
        assert await states(ref) == {}
        await ref.stop()


async def test_a_child_that_shields_its_cleanup_past_shutdown_is_reported_overdue(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A trio task cannot be killed: the stop waits for it, and says so once `shutdown` is over.
    stubborn = shielded_cleanup(10)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(stubborn, id="s", shutdown=2)]).run)
        t0 = trio.current_time()
        with capture_logs() as logs:
            await ref.terminate_child("s")
        assert trio.current_time() - t0 == pytest.approx(10.0)
        overdue = [e for e in logs if e["event"] == "child_shutdown_overdue"]
        assert overdue and overdue[0]["child"] == "s" and overdue[0]["shutdown"] == 2
        await ref.stop()


async def test_start_child_appends_and_reports_conflicts(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor([sv.child(journal.worker("a"), id="a")], strategy="rest_for_one")
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        info = await ref.start_child(sv.child(journal.worker("z"), id="z"))
        assert info.id == "z" and info.state == "running"
        assert [c.id for c in await ref.which_children()] == ["a", "z"]
        with pytest.raises(sv.AlreadyRunning):
            await ref.start_child(sv.child(journal.worker("z"), id="z"))
        await ref.terminate_child("z")
        with pytest.raises(sv.AlreadyPresent, match="restart_child or delete_child"):
            await ref.start_child(sv.child(journal.worker("z"), id="z"))
        with pytest.raises(sv.InvalidValue, match="ChildSpec"):
            await ref.start_child("not a spec")  # type: ignore[arg-type]
        # the appended child stops first
        await ref.restart_child("z")
        await ref.stop()
    assert journal.of("stop")[-2:] == ["z", "a"]


async def test_start_child_that_fails_is_not_kept(autojump_clock: trio.abc.Clock) -> None:
    class Broken(sv.Server):
        async def init(self) -> None:
            raise ValueError("bad config")

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([]).run)
        with pytest.raises(sv.StartFailed, match="'x' failed to start") as info:
            await ref.start_child(sv.child(Broken, id="x"))
        assert isinstance(info.value.__cause__, ValueError)
        assert await ref.which_children() == []
        await ref.stop()


async def test_restart_child_that_fails_keeps_the_spec(autojump_clock: trio.abc.Clock) -> None:
    inits: list[int] = []

    class SecondFails(sv.Server):
        async def init(self) -> None:
            inits.append(1)
            if len(inits) == 2:
                raise ValueError("nope")

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(SecondFails, id="s")]).run)
        await ref.terminate_child("s")
        with pytest.raises(sv.StartFailed):
            await ref.restart_child("s")
        assert await states(ref) == {"s": "stopped"}
        await ref.restart_child("s")
        assert await states(ref) == {"s": "running"}
        await ref.stop()


async def test_terminating_a_temporary_child_forgets_it(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor([sv.child(journal.worker("t"), id="t", restart="temporary")])
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await ref.terminate_child("t")
        assert await ref.which_children() == []
        await ref.stop()


async def test_a_stopped_supervisor_answers_noproc(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(journal.worker("a"), id="a")]).run)
        await ref.stop()
        await ref.stop()  # idempotent
    assert not ref.alive
    for call in (
        ref.which_children(),
        ref.count_children(),
        ref.terminate_child("a"),
        ref.restart_child("a"),
        ref.delete_child("a"),
        ref.start_child(sv.child(journal.worker("b"), id="b")),
    ):
        with pytest.raises(sv.NoProc):
            await call


async def test_a_child_may_stop_its_own_supervisor(autojump_clock: trio.abc.Clock) -> None:
    stopped: list[bool] = []

    async def quitter() -> None:
        await trio.sleep(1)
        ref = sv.whereis("top", sv.SupervisorRef)
        assert ref is not None
        try:
            await ref.stop()
        except trio.Cancelled:
            stopped.append(True)
            raise

    await sv.Supervisor([sv.child(quitter, id="q")]).run(name="top")
    assert stopped == [True]
    assert sv.whereis("top", sv.SupervisorRef) is None


async def test_supervisor_registration(autojump_clock: trio.abc.Clock) -> None:
    inner = sv.Supervisor([])
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(
            sv.Supervisor([sv.child(inner, id="inner", name="inner-sup")]).run
        )
        found = sv.whereis("inner-sup", sv.SupervisorRef)
        assert found is not None and found.path == "root/inner"
        with pytest.raises(TypeError, match="not a ServerRef"):
            sv.whereis("inner-sup")
        assert sv.registered() == ["inner-sup"]
        await ref.stop()
    assert sv.registered() == []


# --------------------------------------------------------------------------- dynamic


async def test_dynamic_supervisor_starts_children_on_demand(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    dyn = sv.DynamicSupervisor(max_children=2)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(dyn.run)
        assert isinstance(ref, sv.DynamicSupervisorRef)
        assert await ref.which_children() == []
        await ref.start_child(sv.child(journal.worker("a"), id="a"))
        await ref.start_child(sv.child(journal.worker("b", crash_after=1), id="b"))
        with pytest.raises(sv.TooManyChildren, match="max_children=2"):
            await ref.start_child(sv.child(journal.worker("c"), id="c"))
        with pytest.raises(sv.AlreadyRunning):
            await ref.start_child(sv.child(journal.worker("a"), id="a"))
        await trio.sleep(1.5)
        assert journal.count("start", "b") == 2  # permanent: restarted
        await ref.terminate_child("a")  # terminated dynamic children are forgotten
        assert [c.id for c in await ref.which_children()] == ["b"]
        await ref.start_child(
            sv.child(journal.worker("c", exit_after=1), id="c", restart="transient")
        )
        await trio.sleep(1.1)
        assert [c.id for c in await ref.which_children()] == ["b"]  # c finished and is gone
        assert not hasattr(ref, "restart_child") and not hasattr(ref, "delete_child")
        await ref.stop()


async def test_dynamic_supervisor_gives_up(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    dyn = sv.DynamicSupervisor(max_restarts=1, max_seconds=10)
    with pytest.RaisesGroup(sv.GaveUp):
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(dyn.run)
            await ref.start_child(sv.child(journal.worker("ok"), id="ok"))
            await ref.start_child(sv.child(journal.worker("bad", crash_after=1), id="bad"))
            await trio.sleep_forever()
    assert journal.count("stop", "ok") == 1


async def test_dynamic_supervisor_rejects_significant_children(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def w() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.DynamicSupervisor().run)
        with pytest.raises(sv.InvalidValue, match="significant"):
            await ref.start_child(sv.child(w, id="w", restart="transient", significant=True))
        await ref.stop()


async def test_dynamic_children_stop_concurrently(autojump_clock: trio.abc.Clock) -> None:
    slow_stopper = shielded_cleanup(3)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.DynamicSupervisor().run)
        for i in range(5):
            await ref.start_child(sv.child(slow_stopper, id=f"w{i}"))
        t0 = trio.current_time()
        await ref.stop()
        assert trio.current_time() - t0 == pytest.approx(3.0)  # virtual time: all at once


# --------------------------------------------------------------------------- auto_shutdown


async def test_any_significant_shuts_the_supervisor_down(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(journal.worker("bystander"), id="bystander"),
            sv.child(
                journal.worker("job", exit_after=2), id="job", restart="transient", significant=True
            ),
        ],
        auto_shutdown="any_significant",
    )
    await sup.run()  # returns on its own
    assert trio.current_time() == pytest.approx(2.0)
    assert journal.of("stop") == ["job", "bystander"]


async def test_all_significant_waits_for_the_last_one(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [
            sv.child(
                journal.worker("j1", exit_after=1), id="j1", restart="temporary", significant=True
            ),
            sv.child(
                journal.worker("j2", crash_after=3), id="j2", restart="temporary", significant=True
            ),
            sv.child(journal.worker("other"), id="other"),
        ],
        auto_shutdown=sv.AutoShutdown.ALL_SIGNIFICANT,
    )
    await sup.run()
    assert trio.current_time() == pytest.approx(3.0)


async def test_significant_transient_crash_is_restarted_not_shut_down(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    crashes = [True]

    async def job() -> None:
        journal.events.append(("start", "job"))
        await trio.sleep(1)
        if crashes:
            crashes.pop()
            raise RuntimeError("transient failure")

    sup = sv.Supervisor(
        [sv.child(job, id="job", restart="transient", significant=True)],
        auto_shutdown="any_significant",
    )
    await sup.run()
    assert journal.count("start", "job") == 2
    assert trio.current_time() == pytest.approx(2.0)


async def test_auto_shutdown_propagates_as_shutdown_to_the_parent(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    inner = sv.Supervisor(
        [
            sv.child(
                journal.worker("job", exit_after=1), id="job", restart="transient", significant=True
            )
        ],
        auto_shutdown="any_significant",
    )
    outer = sv.Supervisor(
        [
            sv.child(journal.worker("keep"), id="keep"),
            sv.child(inner, id="inner", restart="transient", significant=True),
        ],
        auto_shutdown="any_significant",
    )
    await outer.run()
    assert journal.events == [
        ("start", "keep"),
        ("start", "job"),
        ("stop", "job"),
        ("stop", "keep"),
    ]


async def test_terminate_child_of_a_significant_child_does_not_shut_down(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    sup = sv.Supervisor(
        [sv.child(journal.worker("job"), id="job", restart="transient", significant=True)],
        auto_shutdown="any_significant",
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sup.run)
        await ref.terminate_child("job")
        await trio.sleep(1)
        assert ref.alive
        await ref.stop()


async def test_a_named_dynamic_supervisor_inside_a_tree(
    journal: Journal, autojump_clock: trio.abc.Clock
) -> None:
    tree = sv.Supervisor(
        [
            sv.child(sv.DynamicSupervisor(max_children=10), id="pool", name="pool"),
            sv.child(journal.worker("after"), id="after"),
        ],
        strategy="rest_for_one",
    )
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(tree.run)
        pool = sv.whereis("pool", sv.DynamicSupervisorRef)
        assert pool is not None and pool.path == "root/pool"
        for i in range(3):
            await pool.start_child(
                sv.child(journal.worker(f"job{i}"), id=f"job{i}", restart="transient")
            )
        assert await pool.count_children() == sv.ChildCounts(
            specs=3, active=3, supervisors=0, workers=3
        )
        await ref.stop()
    # rest_for_one order: "after" stops before the pool, whose jobs stop together
    assert journal.of("stop")[0] == "after"
    assert sorted(journal.of("stop")[1:]) == ["job0", "job1", "job2"]
