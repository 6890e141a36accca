"""Server (gen_server): call / cast / info, timeouts, crashes, registry, lifecycle."""

from __future__ import annotations

import functools
import threading
from typing import Any

import pytest
import trio
import trio.lowlevel
from structlog.testing import capture_logs

import supervise as sv


class Counter(sv.Server):
    async def init(self, start: int = 0) -> None:
        self.value = start
        self.infos: list[Any] = []

    def handle_call(self, request: Any) -> Any:
        match request:
            case "get":
                return self.value
            case ("add", n):
                self.value += n
                return self.value
            case "boom":
                raise ValueError("boom in handle_call")
        raise AssertionError(f"unexpected {request!r}")

    def handle_cast(self, message: Any) -> None:
        if message == "crash":
            raise RuntimeError("cast crash")
        self.value += message

    def handle_info(self, message: Any) -> None:
        self.infos.append(message)


class Slow(sv.Server):
    """Async handlers: each call sleeps, so calls queue up."""

    async def init(self) -> None:
        self.terminated: list[sv.ExitReason] = []
        self.seen: list[Any] = []

    async def handle_call(self, request: Any) -> Any:
        self.seen.append(request)
        await trio.sleep(request)
        return request

    async def terminate(self, reason: sv.ExitReason) -> None:
        TERMINATED.append(reason)
        await trio.sleep(1)


TERMINATED: list[sv.ExitReason] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    TERMINATED.clear()


async def test_call_cast_info_in_order(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(
            sv.Supervisor([sv.child(Counter, 10, id="c", name="counter")]).run
        )
        counter = sv.whereis("counter")
        assert isinstance(counter, sv.ServerRef)
        assert await counter.call("get") == 10
        counter.cast(5)
        counter.cast(7)
        counter.send("hello")
        assert await counter.call(("add", 1)) == 23  # casts were handled first, in order
        [info] = await ref.which_children()
        assert info.ref is counter
        await ref.stop()


async def test_call_timeout_is_a_timeout_error(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Slow.serve)
        t0 = trio.current_time()
        with pytest.raises(sv.CallTimeout, match="timed out after 2 s") as info:
            await ref.call(10, timeout=2)
        assert isinstance(info.value, TimeoutError)
        assert trio.current_time() - t0 == pytest.approx(2.0)
        # the server still handles the late request; later calls work
        assert await ref.call(1, timeout=None) == 1
        assert trio.current_time() - t0 == pytest.approx(11.0)
        nursery.cancel_scope.cancel()


async def test_default_timeout_is_five_seconds(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Slow.serve)
        t0 = trio.current_time()
        with pytest.raises(sv.CallTimeout):
            await ref.call(60)
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert await ref.call(0.5, timeout=None) == 0.5
        nursery.cancel_scope.cancel()


async def test_many_concurrent_calls_with_mixed_timeouts(autojump_clock: trio.abc.Clock) -> None:
    """One timer serves all deadlines: each call fails or succeeds exactly by its own."""
    results: dict[int, object] = {}

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Slow.serve)

        async def caller(i: int, limit: float) -> None:
            try:
                results[i] = await ref.call(1, timeout=limit)
            except sv.CallTimeout:
                results[i] = trio.current_time()

        # 6 calls queue up, each taking 1 s: the k-th finishes at t0 + k
        t0 = trio.current_time()
        timeouts = [3.5, 0.5, 10, 2.5, 100, 5.5]
        async with trio.open_nursery() as callers:
            for i, timeout in enumerate(timeouts):
                callers.start_soon(caller, i, timeout)
                await trio.lowlevel.checkpoint()
        assert results[0] == 1
        assert results[1] == pytest.approx(t0 + 0.5)  # timed out
        assert results[2] == 1
        assert results[3] == pytest.approx(t0 + 2.5)  # timed out while queued
        assert results[4] == 1 and results[5] == 1
        nursery.cancel_scope.cancel()


async def test_exception_in_handle_call_reaches_caller_and_crashes_server(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(Counter, 1, id="c", name="counter")]).run)
        first = sv.whereis("counter")
        assert first is not None
        await first.call(("add", 1))
        with pytest.raises(ValueError, match="boom in handle_call"):
            await first.call("boom")
        assert not first.alive
        with pytest.raises(sv.NoProc):
            await first.call("get")
        await trio.sleep(0.1)
        second = sv.whereis("counter")
        assert second is not None and second is not first
        assert await second.call("get") == 1  # a restart builds a new instance from the args
        assert (await ref.which_children())[0].restarts == 1
        await ref.stop()


async def test_pending_callers_get_noproc_when_the_server_crashes(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Crashy(sv.Server):
        async def handle_call(self, request: Any) -> Any:
            await trio.sleep(1)
            raise RuntimeError("crash")

    outcomes: list[str] = []

    async def caller(ref: sv.ServerRef) -> None:
        try:
            await ref.call("x")
        except RuntimeError:
            outcomes.append("crash")
        except sv.NoProc as exc:
            assert "exited (abnormal: RuntimeError: crash) before replying" in str(exc)
            outcomes.append("noproc")

    async with trio.open_nursery() as callers:
        with pytest.RaisesGroup(RuntimeError):  # standalone serve() raises what crashed it
            async with trio.open_nursery() as nursery:
                ref = await nursery.start(Crashy.serve)
                for _ in range(3):
                    callers.start_soon(caller, ref)
                await trio.sleep_forever()
    assert sorted(outcomes) == ["crash", "noproc", "noproc"]


async def test_cast_and_send_never_raise(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(Counter, id="c", name="c")]).run)
        counter = sv.whereis("c")
        assert counter is not None
        counter.cast("crash")  # crashes the server, not the caster
        await trio.sleep(0.1)
        assert not counter.alive
        counter.cast(1)
        counter.send("ignored")
        assert sv.whereis("c") is not counter
        await ref.stop()
        counter.cast(1)


async def test_unknown_info_is_logged_and_an_unhandled_cast_crashes(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Plain(sv.Server):
        def handle_call(self, request: Any) -> Any:
            return request

    with pytest.RaisesGroup(NotImplementedError):
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(Plain.serve)
            with capture_logs() as logs:
                ref.send("stray")
                assert await ref.call("still alive") == "still alive"
            assert [e["event"] for e in logs] == ["server_unexpected_info"]
            ref.cast("no handle_cast")  # OTP: a cast nobody handles crashes the server
            await trio.sleep_forever()


async def test_terminate_gets_the_reason(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        sup = await nursery.start(
            sv.Supervisor([sv.child(Slow, id="s", name="s", restart="temporary")]).run
        )
        ref = sv.whereis("s")
        assert ref is not None
        await ref.stop()
        assert [sv.ExitReason(sv.ExitKind.NORMAL)] == TERMINATED
        assert await sup.which_children() == []
        await sup.stop()


async def test_terminate_runs_on_shutdown_within_the_shutdown_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Stubborn(sv.Server):
        async def terminate(self, reason: sv.ExitReason) -> None:
            TERMINATED.append(reason)
            await trio.sleep(100)

    async with trio.open_nursery() as nursery:
        sup = await nursery.start(sv.Supervisor([sv.child(Stubborn, id="s", shutdown=2)]).run)
        t0 = trio.current_time()
        await sup.stop()
        assert trio.current_time() - t0 == pytest.approx(2.0)
    assert [r.kind for r in TERMINATED] == [sv.ExitKind.SHUTDOWN]


def test_each_trio_run_has_its_own_registry() -> None:
    """Two runs at once in two threads: a name registered in one is unknown in the other."""
    registered, checked = threading.Event(), threading.Event()
    seen: list[object] = []

    async def holder() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sv.Supervisor([sv.child(Counter, id="c", name="counter")]).run)
            assert sv.whereis("counter") is not None
            registered.set()
            await trio.to_thread.run_sync(checked.wait)
            nursery.cancel_scope.cancel()

    async def looker() -> None:
        await trio.to_thread.run_sync(registered.wait)
        seen.append(sv.whereis("counter"))
        checked.set()

    thread = threading.Thread(target=trio.run, args=(holder,))
    thread.start()
    try:
        trio.run(looker)
    finally:
        checked.set()
        thread.join(10)
    assert seen == [None]


async def test_registry_is_per_run_and_names_are_unique(autojump_clock: trio.abc.Clock) -> None:
    assert sv.whereis("counter") is None  # nothing leaks from other tests' runs
    async with trio.open_nursery() as nursery:
        await nursery.start(sv.Supervisor([sv.child(Counter, id="c", name="counter")]).run)
        with pytest.raises(sv.AlreadyRegistered, match="'counter' is already registered"):
            await Counter.serve(name="counter")
        sup = sv.Supervisor([sv.child(Counter, id="c2", name="counter")])
        with pytest.raises(sv.StartFailed) as info:
            await nursery.start(sup.run)
        assert isinstance(info.value.__cause__, sv.AlreadyRegistered)
        nursery.cancel_scope.cancel()


def test_registry_needs_a_trio_run() -> None:
    with pytest.raises(RuntimeError, match=r"inside trio\.run"):
        sv.whereis("x")


async def test_call_argument_and_self_call_errors(autojump_clock: trio.abc.Clock) -> None:
    class SelfCaller(sv.Server):
        async def handle_call(self, request: Any) -> Any:
            return await self.ref.call("again")

    async with trio.open_nursery() as nursery:
        sup = await nursery.start(
            sv.Supervisor([sv.child(SelfCaller, id="s", name="s", restart="temporary")]).run
        )
        ref = sv.whereis("s")
        assert ref is not None
        with pytest.raises(ValueError, match="timeout"):
            await ref.call("x", timeout=0)
        with pytest.raises(RuntimeError, match="called itself: that would deadlock"):
            await ref.call("x")
        await sup.stop()


async def test_cancelled_caller_leaves_the_server_alive(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Slow.serve)
        with trio.move_on_after(0.5):
            await ref.call(2)
        assert ref.alive
        assert await ref.call(0.1) == 0.1
        nursery.cancel_scope.cancel()


async def test_messages_during_init_are_queued(autojump_clock: trio.abc.Clock) -> None:
    class SlowInit(sv.Server):
        async def init(self) -> None:
            await trio.sleep(3)
            self.ready = True

        def handle_call(self, request: Any) -> Any:
            return self.ready

    async def early_caller() -> None:
        await trio.sleep(1)  # SlowInit registered its name and is still in init
        ref = sv.whereis("slow")
        assert ref is not None
        assert await ref.call("ready?") is True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(early_caller)
        await nursery.start(functools.partial(SlowInit.serve, name="slow"))
        await trio.sleep(1)
        nursery.cancel_scope.cancel()


async def test_serve_standalone_returns_on_stop_and_shutdown(
    autojump_clock: trio.abc.Clock,
) -> None:
    class Quitter(sv.Server):
        def handle_call(self, request: Any) -> Any:
            raise sv.Shutdown("asked to")

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Counter.serve)
        await ref.stop()
        assert not ref.alive
        with pytest.raises(sv.NoProc):
            await ref.stop()
        quitter = await nursery.start(Quitter.serve)
        with pytest.raises(sv.Shutdown):
            await quitter.call("bye")
    # both serve() calls returned without raising


async def test_a_busy_server_stays_cancellable() -> None:
    """Real clock: a server that never runs out of messages still yields and gets cancelled."""

    class Sink(sv.Server):
        def handle_cast(self, message: Any) -> None:
            self.ref.cast(message)  # an endless stream of messages to itself

    with trio.move_on_after(0.2) as scope:
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(Sink.serve)
            ref.cast(0)
            await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_handlers_may_be_sync_or_async(autojump_clock: trio.abc.Clock) -> None:
    seen: list[Any] = []

    class Mixed(sv.Server):
        def init(self, tag: str) -> None:  # a plain-def init is accepted too
            self.tag = tag

        async def handle_call(self, request: Any) -> Any:
            await trio.sleep(1)
            return (self.tag, request)

        async def handle_cast(self, message: Any) -> None:
            await trio.sleep(1)
            seen.append(("cast", message))

        async def handle_info(self, message: Any) -> None:
            seen.append(("info", message))

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(Mixed.serve, "t")
        ref.cast(1)
        ref.send(2)
        assert await ref.call(3) == ("t", 3)
        assert seen == [("cast", 1), ("info", 2)]
        assert trio.current_time() == pytest.approx(2.0)
        await ref.stop()


async def test_init_errors_and_default_handlers(autojump_clock: trio.abc.Clock) -> None:
    class Bare(sv.Server):
        pass

    with pytest.raises(TypeError, match="takes no arguments"):
        await Bare.serve(1)
    with pytest.RaisesGroup(pytest.RaisesExc(NotImplementedError, match="does not handle calls")):
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(Bare.serve)
            with pytest.raises(NotImplementedError):
                await ref.call("anything")
            await trio.sleep_forever()


async def test_a_failing_terminate_makes_the_exit_abnormal(autojump_clock: trio.abc.Clock) -> None:
    class BadTerminate(sv.Server):
        def terminate(self, reason: sv.ExitReason) -> None:
            raise OSError("could not flush")

    sup = sv.Supervisor(
        [sv.child(BadTerminate, id="b", name="b", restart="transient")], max_restarts=0
    )
    with capture_logs() as logs, pytest.RaisesGroup(sv.GaveUp) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            ref = sv.whereis("b")
            assert ref is not None
            await ref.stop()  # a normal stop, but terminate fails: abnormal -> transient restart
            await trio.sleep_forever()
    assert isinstance(info.value.exceptions[0].__cause__, OSError)
    assert "server_terminate_failed" in [e["event"] for e in logs]
