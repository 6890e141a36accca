"""`TaskPool` in virtual time, its workers played in-process over the real socket pair (a
fake `WorkerStarter`): kept warm, reused, grown only for long attempts, retired after
``max_tasks`` or when idle above the floor; a worker dying mid-attempt ends that attempt as a
loss and is replaced; a signalled worker is never reused; failed starts make the pool
unavailable (the caller falls back to a fresh process). The wire's messages are checked at
construction."""

from __future__ import annotations

import itertools
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import pytest
import trio

from supervise._testing.poll import wait_until_async
from supervise._validation import InvalidValue
from supervise.tasks import decode as decode_value
from supervise.tasks._pool_wire import HEADER, Done, Order, Ready, decode, encode, length
from supervise.tasks.journal import MemoryJournal, Outcome
from supervise.tasks.pool import (
    BROKEN_AFTER,
    LONG_S,
    SPAWN_AT_ONCE,
    Assigned,
    PoolSettings,
    PoolUnavailable,
    TaskPool,
)

START_S = 2.0  # a worker's imports, in virtual seconds


class FakeHandle:
    """A worker 'process': exits when signalled, stopped, or when its script says so."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.reason: str | None = None
        self.exited = trio.Event()
        self.signals: list[int] = []
        self.ran: list[Order] = []

    def exit(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.exited.set()

    def signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.exit(f"killed by signal {signum}")

    async def wait(self) -> object:
        await self.exited.wait()
        return self.reason

    async def stop(self, timeout: float | None = None) -> object:  # noqa: ASYNC109
        self.exit("stopped")
        return await self.wait()


class FakeWorkers:
    """The pool's starter: each worker speaks the wire on its end of the socket pair; an
    order's env says what its attempt does (SLEEP seconds; CRASH: die before `Done`)."""

    def __init__(self) -> None:
        self.handles: list[FakeHandle] = []
        self.fail_starts = 0  # the next this many starts die before Ready
        self._pids = itertools.count(1000)

    @property
    def started(self) -> int:
        return len(self.handles)

    def alive(self) -> list[FakeHandle]:
        return [h for h in self.handles if h.reason is None]

    async def __call__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        fd: int,
        label: str,
        *,
        task_status: trio.TaskStatus[Any],
    ) -> object:
        assert argv[-1] == str(fd) or argv[-2] == str(fd)
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(fd)))
        handle = FakeHandle(next(self._pids))
        self.handles.append(handle)
        task_status.started(handle)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve, sock, handle)
                await handle.wait()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
        return handle.reason

    async def _serve(self, sock: Any, handle: FakeHandle) -> None:
        if self.fail_starts:
            self.fail_starts -= 1
            handle.exit("exit code 1")
            return
        await trio.sleep(START_S)
        await sock.send(encode(Ready(handle.pid)))
        while True:
            header = await _recv(sock, HEADER)
            if header is None:
                handle.exit("exit code 0")
                return
            order = decode(await _recv(sock, length(header)) or b"")
            assert isinstance(order, Order)
            handle.ran.append(order)
            await trio.sleep(float(order.env.get("SLEEP", "0.01")))
            if order.env.get("CRASH"):
                handle.exit("killed by signal 9")
                return
            await sock.send(encode(Done(0)))


async def _recv(sock: Any, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _order(i: int = 0, **env: str) -> Order:
    return Order(f"spec-{i}".encode(), 1, "0", env)


async def _started_pool(
    nursery: trio.Nursery, settings: PoolSettings
) -> tuple[TaskPool, FakeWorkers]:
    fakes = FakeWorkers()
    pool = TaskPool(settings, starter=fakes)
    await nursery.start(pool.run)
    return pool, fakes


async def _until(cond: Any) -> None:
    # virtual seconds: a hang fails, a slow machine never does
    await wait_until_async(cond, what="the pool's state", timeout_s=600.0, interval_s=0.05)


async def test_workers_are_kept_warm_and_reused(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        pool, fakes = await _started_pool(nursery, PoolSettings(workers=2))
        await _until(lambda: pool.idle == 2)
        pids: list[int] = []
        for i in range(20):
            assert (await pool.run_attempt(_order(i), lambda a: pids.append(a.pid))).lost == ""
        assert fakes.started == 2  # no start per attempt
        assert len(set(pids)) <= 2 and sum(len(h.ran) for h in fakes.handles) == 20
        nursery.cancel_scope.cancel()


async def test_tiny_attempts_queue_for_busy_workers_instead_of_growing_the_pool(
    autojump_clock: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        pool, fakes = await _started_pool(nursery, PoolSettings(workers=2))
        await _until(lambda: pool.idle == 2)
        ends: list[str] = []

        async def one(i: int) -> None:
            ends.append((await pool.run_attempt(_order(i, SLEEP="0.05"), lambda a: None)).lost)

        async with trio.open_nursery() as attempts:
            for i in range(40):
                attempts.start_soon(one, i)
        assert ends == [""] * 40
        assert fakes.started == 2  # each frees up long before a start would pay off
        nursery.cancel_scope.cancel()


async def test_long_attempts_grow_the_pool_and_idle_extras_go(autojump_clock: Any) -> None:
    settings = PoolSettings(workers=1, idle_s=30.0)
    async with trio.open_nursery() as nursery:
        pool, fakes = await _started_pool(nursery, settings)
        await _until(lambda: pool.idle == 1)
        t0 = trio.current_time()
        starts: list[float] = []

        async def long(i: int) -> None:
            order = _order(i, SLEEP="20")
            await pool.run_attempt(order, lambda a: starts.append(trio.current_time() - t0))

        async with trio.open_nursery() as attempts:
            for i in range(4):
                attempts.start_soon(long, i)
        # each waited at most for a long-busy pool to start it a worker, not for the others
        assert len(starts) == 4 and max(starts) < 20.0
        assert fakes.started == 4
        assert pool.size == 4
        await _until(lambda: pool.size == 1)  # the three above the floor idled out
        assert pool.idle == 1
        nursery.cancel_scope.cancel()
    assert LONG_S < 20.0


async def test_a_worker_dying_mid_attempt_is_a_loss_and_is_replaced(
    autojump_clock: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        pool, fakes = await _started_pool(nursery, PoolSettings(workers=2))
        await _until(lambda: pool.idle == 2)
        lost = (await pool.run_attempt(_order(1, CRASH="1"), lambda a: None)).lost
        assert "killed by signal 9" in lost
        await _until(lambda: pool.idle == 2)  # replaced
        assert fakes.started == 3
        assert (await pool.run_attempt(_order(2), lambda a: None)).lost == ""
        nursery.cancel_scope.cancel()


async def test_a_signalled_worker_is_never_reused(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        pool, fakes = await _started_pool(nursery, PoolSettings(workers=1))
        await _until(lambda: pool.idle == 1)
        held: list[Assigned] = []
        lost = ""

        async def attempt() -> None:
            nonlocal lost
            lost = (await pool.run_attempt(_order(1, SLEEP="50"), held.append)).lost

        async with trio.open_nursery() as attempts:
            attempts.start_soon(attempt)
            await _until(lambda: held)
            held[0].stop(hard=False)  # a pause: SIGTERM to the worker
        first = fakes.handles[0]
        assert first.signals == [signal.SIGTERM] and "signal" in lost
        await _until(lambda: pool.idle == 1)
        assert (await pool.run_attempt(_order(2), lambda a: None)).lost == ""
        assert len(first.ran) == 1 and fakes.started == 2
        held[0].stop(hard=True)  # too late: that attempt is over, nothing is signalled
        assert first.signals == [signal.SIGTERM]
        nursery.cancel_scope.cancel()


async def test_workers_are_replaced_after_max_tasks(autojump_clock: Any) -> None:
    async with trio.open_nursery() as nursery:
        pool, fakes = await _started_pool(nursery, PoolSettings(workers=1, max_tasks=3))
        await _until(lambda: pool.idle == 1)
        for i in range(7):
            assert (await pool.run_attempt(_order(i), lambda a: None)).lost == ""
        assert [len(h.ran) for h in fakes.handles] == [3, 3, 1]
        assert [h.reason for h in fakes.handles[:2]] == ["exit code 0"] * 2  # retired cleanly
        nursery.cancel_scope.cancel()


async def test_failed_starts_make_the_pool_unavailable_then_it_recovers(
    autojump_clock: Any,
) -> None:
    async with trio.open_nursery() as nursery:
        fakes = FakeWorkers()
        fakes.fail_starts = BROKEN_AFTER
        pool = TaskPool(PoolSettings(workers=1), starter=fakes)
        await nursery.start(pool.run)
        with pytest.raises(PoolUnavailable):
            await pool.run_attempt(_order(), lambda a: None)
        await _until(lambda: pool.idle == 1)  # it kept trying, backing off
        assert (await pool.run_attempt(_order(), lambda a: None)).lost == ""
        nursery.cancel_scope.cancel()


def test_settings_and_messages_are_checked() -> None:
    assert PoolSettings().for_cores(2.5).workers == 3
    assert PoolSettings(workers=5).for_cores(64).workers == 5
    assert PoolSettings(preload="numpy, stages.sub").preload == ("numpy", "stages.sub")
    for bad in ({"workers": -1}, {"max_tasks": 1.5}, {"idle_s": 0}, {"preload": "a-b"}):
        with pytest.raises(InvalidValue):
            PoolSettings(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidValue):
        Order(b"spec", 0, "0")
    with pytest.raises(InvalidValue):
        Order(b"spec", 1, "0", {"A": 1})  # type: ignore[dict-item]
    order = Order(b"spec", 2, "n1", {"A": "b"})
    frame = encode(order)
    assert length(frame[:HEADER]) == len(frame) - HEADER
    assert decode(frame[HEADER:]) == order
    assert decode(encode(Done(1))[HEADER:]) == Done(1)
    with pytest.raises(ValueError, match="not a task pool message"):
        decode(b"\x01")


def test_a_refused_commit_ends_the_warm_worker_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal error out of the attempt's nursery (a commit refused: lease lapsed) leaves
    the worker in doubt: it exits (CANNOT_RUN), saying why in one line, not a traceback."""
    from supervise.snapshot.errors import SnapshotError
    from supervise.tasks import TaskSpec, _pool_worker

    async def refused(_spec: Any, _attempt: int, _node: str, journal: Any) -> int:
        journal.read()
        async with trio.open_nursery():
            raise SnapshotError("agent refused 'begin': task journal commit refused: lease lapsed")

    class Journal:
        closed = False

        @staticmethod
        def read() -> None:
            return None

        class owner:  # what ArenaJournal.owner is: an AgentClient
            @staticmethod
            def close() -> None:
                Journal.closed = True

    monkeypatch.setattr(_pool_worker, "run_one", refused)
    monkeypatch.setattr(_pool_worker, "agent_journal", lambda: Journal)
    order = Order(TaskSpec("m:f").to_bytes(), 1, "0")
    assert _pool_worker._attempt(order) == (_pool_worker.CANNOT_RUN, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lease lapsed" in err and Journal.closed


class _Held(MemoryJournal):
    """A journal standing in for the agent's (`agent_journal`), counting how often it opens."""

    opened = 0

    def __init__(self) -> None:
        super().__init__()
        _Held.opened += 1
        self.owner = self  # what ArenaJournal.owner is: closed after the attempt

    def close(self) -> None:
        pass


def test_a_warm_worker_hands_a_small_outcome_back_and_opens_only_the_journals_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An order on an empty journal whose task commits no step never reaches the journal
    endpoint: its outcome rides `Done` for the agent to commit. A task that commits a step,
    an order on a journal that holds something, or an outcome too large for `Done` go
    through the journal."""
    from supervise.tasks import TaskSpec, _pool_worker

    _Held.opened = 0
    monkeypatch.setattr(_pool_worker, "agent_journal", _Held)
    plain = TaskSpec("taskfuncs:plain", (7,)).to_bytes()
    code, outcome = _pool_worker._attempt(Order(plain, 1, "0", fresh=True))
    assert code == 0 and outcome is not None and decode_value(outcome.value) == 21
    assert _Held.opened == 0
    # the same task on a journal that holds something: read first
    code, outcome = _pool_worker._attempt(Order(plain, 2, "0"))
    assert (code, _Held.opened) == (0, 1) and outcome is not None and outcome.attempt == 2
    # a task that commits a step opens its journal even when it starts empty
    steps = TaskSpec("taskfuncs:two_steps", (2,)).to_bytes()
    code, outcome = _pool_worker._attempt(Order(steps, 1, "0", fresh=True))
    assert (code, _Held.opened) == (0, 2) and outcome is not None and outcome.ok
    # an outcome too large for Done is committed by the worker itself
    monkeypatch.setattr(_pool_worker, "INLINE_OUTCOME", 0)
    code, outcome = _pool_worker._attempt(Order(plain, 1, "0", fresh=True))
    assert (code, outcome, _Held.opened) == (0, None, 3)
    done = Done(0, Outcome(1, value=b"\x01"))
    assert decode(encode(done)[HEADER:]) == done
    fresh = Order(b"spec", 1, "0", fresh=True)
    assert decode(encode(fresh)[HEADER:]) == fresh


async def test_a_pool_fills_to_its_floor_as_soon_as_its_first_workers_are_ready(
    autojump_clock: Any,
) -> None:
    """Workers start `SPAWN_AT_ONCE` at a time: the next ones start as the first say Ready,
    not after the idle check's period (``idle_s / 2``)."""
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        pool, fakes = await _started_pool(nursery, PoolSettings(workers=3 * SPAWN_AT_ONCE))
        await _until(lambda: pool.idle == 3 * SPAWN_AT_ONCE)
        assert trio.current_time() - t0 < 4 * START_S < PoolSettings().idle_s / 2
        assert fakes.started == 3 * SPAWN_AT_ONCE
        nursery.cancel_scope.cancel()
