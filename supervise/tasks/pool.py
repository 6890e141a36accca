"""`TaskPool`: warm worker processes that run one task attempt after another.

A fresh worker per attempt costs an interpreter start and the imports (about a second of
CPU): that, not placement, bounds how many tiny tasks a node runs per second. The pool keeps
``workers`` processes started (`supervise.tasks._pool_worker`, imports done) and hands each
attempt to an idle one, as Celery's prefork pool or Ray's worker pool do. An attempt that finds
none takes the first worker that frees up; while attempts wait and fewer than ``workers`` of
the pool's workers are idle, starting or in an attempt shorter than `LONG_S` (the others are
held by long tasks), it starts more (at most `SPAWN_AT_ONCE` at a time, in the background: the
fork runs in the runtime's spawner thread, never on the trio loop). Workers above ``workers``
idle for ``idle_s`` go.

A worker is an `OsProcess` child of the pool's nursery (no orphans; its crash is an exit
reason). One that dies in an attempt (segfault, ``os._exit``, kill -9) ends that attempt as a
loss and is replaced; one that was signalled during an attempt (a pause, a cancel, a zombie's
kill) is never given another; each is retired after ``max_tasks`` attempts. Module state
carries over between the attempts of one worker (the user's own business, as in Celery).
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs
import structlog
import trio

from supervise._validation import InvalidValue
from supervise.runtime.osprocess import OsProcess
from supervise.tasks._pool_wire import HEADER, Done, Order, Ready, decode, encode, length
from supervise.tasks.journal import Outcome

log = structlog.get_logger("supervise.tasks.pool")

SPAWN_AT_ONCE = 2
"""Workers a pool starts at a time (each start is an interpreter and its imports)."""
START_BACKOFF_S = (0.5, 30.0)
"""After a worker failed to start: wait this long before the next (doubling, up to the cap)."""
LONG_S = 1.0
"""A worker busy with one attempt this long no longer counts as one that frees up soon: while
attempts wait, the pool grows until ``workers`` of its workers are free or freeing up soon. A
pool of workers that run tiny tasks one after another does not grow, however many wait (a
start costs far more than the wait); one held by long tasks does."""
BROKEN_AFTER = 3
"""Consecutive failed starts after which attempts stop waiting for the pool (`PoolUnavailable`)."""
_DRAIN_S = 1.0  # after a worker exited: how long its last messages may take to be read


def _count(
    name: str, low: int, *, none: bool = False
) -> Callable[[object, attrs.Attribute[Any], Any], None]:
    def check(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
        if none and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidValue(name, value, f"must be an integer >= {low}")

    return check


def _seconds(_inst: object, _attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidValue("idle_s", value, "must be seconds > 0")


def _modules(value: Any) -> tuple[str, ...]:
    names = tuple(value.split(",") if isinstance(value, str) else value)
    names = tuple(n.strip() for n in names if isinstance(n, str) and n.strip())
    for n in names:
        if not all(part.isidentifier() for part in n.split(".")):
            raise InvalidValue("task_preload", n, "must be module names, e.g. numpy,stages")
    return names


@attrs.frozen(slots=True)
class PoolSettings:
    """A farm node's warm task workers. ``workers``: kept started even when idle (None: one
    per core the node offers, as Celery's concurrency; 0: no pool, a fresh process per
    attempt); ``max_tasks``: attempts per worker before it is replaced (0: no limit);
    ``idle_s``: how long a worker above ``workers`` may stay idle; ``preload``: modules each
    worker imports once, before its first attempt."""

    workers: int | None = attrs.field(default=None, validator=_count("task_workers", 0, none=True))
    max_tasks: int = attrs.field(default=1000, validator=_count("task_max_tasks", 0))
    idle_s: float = attrs.field(default=60.0, validator=_seconds)
    preload: tuple[str, ...] = attrs.field(default=(), converter=_modules)

    @property
    def enabled(self) -> bool:
        """Whether attempts run in warm workers (else each in a fresh process)."""
        return self.workers != 0

    def for_cores(self, cpus: float) -> PoolSettings:
        """These settings on a node offering ``cpus`` cores (``workers`` None: one per core)."""
        if self.workers is not None:
            return self
        return attrs.evolve(self, workers=max(1, math.ceil(cpus)))

    @property
    def floor(self) -> int:
        """Workers kept started (``workers``; None, not resolved yet: 1)."""
        return 1 if self.workers is None else self.workers


class WorkerHandle(Protocol):
    """A started worker as the pool needs it (`ProcessHandle`)."""

    @property
    def pid(self) -> int: ...

    def signal(self, signum: int) -> None: ...
    async def wait(self) -> object: ...
    async def stop(self, timeout: float | None = None) -> object: ...  # noqa: ASYNC109


class WorkerStarter(Protocol):
    """Starts a worker: ``argv`` with ``env``, descriptor ``fd`` inherited under its number;
    hands its `WorkerHandle` to ``task_status`` and returns once it exited."""

    async def __call__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        fd: int,
        label: str,
        *,
        task_status: trio.TaskStatus[Any],
    ) -> object: ...


class PoolUnavailable(RuntimeError):
    """The pool cannot start workers now (its last starts failed): run the attempt elsewhere."""


@attrs.define(eq=False)
class _Worker:
    """One warm worker: its process, the pool's end of its socket, the attempt it runs."""

    sock: trio.socket.SocketType
    handle: WorkerHandle | None = None
    ready: bool = False  # said Ready (its imports are done)
    ran: int = 0
    job: _Job | None = None
    doomed: bool = False  # signalled in an attempt, or retiring: never given another
    idle_since: float = 0.0
    exited: trio.Event = attrs.field(factory=trio.Event)


@attrs.frozen(slots=True)
class Ended:
    """How a pooled attempt ended: ``lost`` "" once its worker said `Done`, else why it ended
    without; ``outcome``: the one its worker handed back to commit (None: in the journal)."""

    lost: str
    outcome: Outcome | None = None


@attrs.define(eq=False)
class _Job:
    """An attempt handed to a worker; ``lost`` says why it ended without a `Done`."""

    order: Order
    since: float = 0.0  # when its worker took it
    done: trio.Event = attrs.field(factory=trio.Event)
    code: int | None = None
    lost: str = ""
    outcome: Outcome | None = None

    def end(self, code: int | None = None, lost: str = "", outcome: Outcome | None = None) -> None:
        if not self.done.is_set():
            self.code, self.lost, self.outcome = code, lost, outcome
            self.done.set()


class Assigned:
    """The worker running one attempt, as its caller sees it: ``pid``; `stop`."""

    def __init__(self, worker: _Worker, job: _Job) -> None:
        self._worker = worker
        self._job = job
        assert worker.handle is not None
        self.pid = worker.handle.pid

    def stop(self, *, hard: bool) -> None:
        """SIGKILL (``hard``) or SIGTERM (the attempt commits its finished steps, then the
        worker exits) — only while the worker still runs this attempt; never reused after."""
        w = self._worker
        if w.job is not self._job or w.handle is None or self._job.done.is_set():
            return
        w.doomed = True
        w.handle.signal(signal.SIGKILL if hard else signal.SIGTERM)


class TaskPool:
    """Warm task workers for one node (see the module's docstring). ``env``: added to each
    worker's environment at its start; ``shutdown``: SIGTERM grace when the pool stops."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        env: Mapping[str, str] | None = None,
        shutdown: float = 5.0,
        label: str = "task worker",
        starter: WorkerStarter | None = None,
    ) -> None:
        """``starter``: how workers start (None: `OsProcess` children, no orphans)."""
        self.settings = settings
        self.starter: WorkerStarter = self._start_process if starter is None else starter
        self.env = dict(env or {})
        self.shutdown = shutdown
        self.label = label
        self.started = 0  # workers started (tests, status)
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []  # the most recently used last: it is taken first
        self._starting = 0
        self._waiting = 0  # attempts waiting for a worker
        self._failures = 0  # consecutive failed starts
        self._retry_at = -math.inf
        self._available = trio.Event()
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- what the pool holds ------------------------------------------------------------

    @property
    def idle(self) -> int:
        """Workers ready for an attempt now."""
        return len(self._idle)

    @property
    def size(self) -> int:
        """Workers started and not exited (busy, idle or still importing)."""
        return len(self._workers)

    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [w.handle.pid for w in self._workers if w.handle is not None]

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool filled until cancelled (its workers are stopped then)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._refill)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._announce()  # nobody waits for a worker from a stopped pool

    async def run_attempt(self, order: Order, on_started: Callable[[Assigned], None]) -> Ended:
        """Run ``order`` in a worker; how it ended (`Ended`: its worker said `Done`, with the
        outcome to commit or none, or why not: its exit's reason). ``on_started`` gets the
        worker as it takes the order. `PoolUnavailable` when workers cannot be started now.
        Cancelled: the worker is stopped (SIGTERM) and not reused."""
        frame = encode(order)
        while True:
            w = await self._acquire()
            job = _Job(order, trio.current_time())
            w.job = job
            try:
                await _send_all(w.sock, frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                w.job = None  # it died idle: its life's end removes it; try another
                w.doomed = True
                continue
            break
        assigned = Assigned(w, job)
        on_started(assigned)
        try:
            await job.done.wait()
        except trio.Cancelled:
            assigned.stop(hard=False)
            raise
        if job.code is not None:
            return Ended("", job.outcome)
        return Ended(job.lost or "task worker exited")

    async def _acquire(self) -> _Worker:
        while True:
            while self._idle:
                w = self._idle.pop()
                if not w.doomed and not w.exited.is_set():
                    return w
            if self._failures >= BROKEN_AFTER:
                raise PoolUnavailable(
                    f"the task pool could not start a worker ({self._failures} tries in a row)"
                )
            if self._nursery is None:
                raise PoolUnavailable("the task pool is not running")
            self._waiting += 1
            self._poke()
            try:
                await self._available.wait()
            finally:
                self._waiting -= 1

    def _poke(self) -> None:
        self._wake.set()

    def _announce(self) -> None:
        """Wake whoever waits for a worker (or for the pool to give up)."""
        self._available.set()
        self._available = trio.Event()

    # -- keeping it filled ----------------------------------------------------------------

    async def _refill(self) -> None:
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            self._retire_idle(now)
            ready = [w for w in self._workers if w.ready and not w.doomed]
            busy = [w.job.since for w in ready if w.job is not None]
            short = [t for t in busy if now - t < LONG_S]
            # every worker counts towards the floor; while attempts wait, only those that
            # are free or freeing up soon
            have = self._starting + len(ready)
            if self._waiting:
                have -= len(busy) - len(short)
            want = self.settings.floor
            wait = self.settings.idle_s / 2
            if self._waiting and short:  # look again when the next one turns long
                wait = min(wait, min(short) + LONG_S - now)
            if now < self._retry_at:
                wait = min(wait, self._retry_at - now)
            else:
                while have < want and self._starting < SPAWN_AT_ONCE:
                    assert self._nursery is not None
                    self._starting += 1
                    have += 1
                    self._nursery.start_soon(self._life)
            with trio.move_on_after(wait):
                await self._wake.wait()

    def _retire_idle(self, now: float) -> None:
        """Workers above ``workers`` idle for ``idle_s`` go (the longest idle first)."""
        extra = len(self._idle) - self.settings.floor
        for w in list(self._idle[:extra] if extra > 0 else []):
            if now - w.idle_since >= self.settings.idle_s:
                self._idle.remove(w)
                self._retire(w)

    def _retire(self, w: _Worker) -> None:
        """End ``w`` (its socket's end: it exits; stopped after the grace if it does not)."""
        w.doomed = True
        if self._nursery is not None:
            self._nursery.start_soon(self._retire_one, w)

    async def _retire_one(self, w: _Worker) -> None:
        with contextlib.suppress(OSError):
            w.sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(self.shutdown):
            await w.exited.wait()
        if not w.exited.is_set() and w.handle is not None:
            await w.handle.stop(0)

    async def _start_process(
        self,
        argv: list[str],
        env: Mapping[str, str],
        fd: int,
        label: str,
        *,
        task_status: trio.TaskStatus[Any],
    ) -> object:
        proc = OsProcess(argv, env=env, pass_fds=[fd])
        return await proc.run(shutdown=self.shutdown, label=label, task_status=task_status)

    def _argv(self, fd: int) -> list[str]:
        argv = [sys.executable, "-m", "supervise.tasks._pool_worker", str(fd)]
        if self.settings.preload:
            argv.append(",".join(self.settings.preload))
        return argv

    async def _life(self) -> None:
        """One worker from its start to its exit (and its replacement's cue)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        w = _Worker(trio.socket.from_stdlib_socket(parent))
        self.started += 1
        n = self.started
        ready_before_exit = False
        why = "the task pool stopped"
        try:
            async with trio.open_nursery() as nursery:
                try:
                    w.handle = await nursery.start(
                        self.starter,
                        self._argv(child.fileno()),
                        self.env,
                        child.fileno(),
                        f"{self.label} {n}",
                    )
                finally:
                    child.close()  # the worker's end is the worker's now
                self._workers.add(w)
                read = trio.Event()
                nursery.start_soon(self._read, w, read)
                reason = await w.handle.wait()
                with trio.move_on_after(_DRAIN_S):  # a Done sent just before the exit
                    await read.wait()
                nursery.cancel_scope.cancel()
            ready_before_exit = w.ready
            why = f"task worker exited ({reason})"
        except OSError as exc:
            why = f"task worker could not start: {exc}"
            log.error("task worker could not start", error=str(exc))
        finally:
            w.exited.set()
            self._workers.discard(w)
            if not w.ready:
                self._starting -= 1
            elif w in self._idle:
                self._idle.remove(w)
            w.sock.close()
            if w.job is not None:
                w.job.end(lost=why)
        if not ready_before_exit:  # it never became ready: a failed start
            self._failures += 1
            delay = min(START_BACKOFF_S[1], START_BACKOFF_S[0] * 2 ** (self._failures - 1))
            self._retry_at = trio.current_time() + delay
            log.warning("task worker failed to start", why=why, retry_in=delay)
            self._announce()  # waiters check whether the pool gave up
        self._poke()

    async def _read(self, w: _Worker, read: trio.Event) -> None:
        """The worker's messages, until its end of the socket closes."""
        try:
            while True:
                header = await _receive(w.sock, HEADER)
                if header is None:
                    return
                payload = await _receive(w.sock, length(header))
                if payload is None:
                    return
                self._on_message(w, decode(payload))
        except (ConnectionResetError, trio.ClosedResourceError):
            return  # it died (killed): its exit tells the rest
        except (OSError, ValueError) as exc:
            log.warning("task worker sent garbage: stopping it", error=str(exc))
            w.doomed = True
            if w.handle is not None:
                w.handle.signal(signal.SIGKILL)
        finally:
            read.set()

    def _on_message(self, w: _Worker, msg: Any) -> None:
        if isinstance(msg, Ready) and not w.ready:
            w.ready = True
            self._starting -= 1
            self._failures = 0
            self._retry_at = -math.inf
            self._idle_again(w)
            self._poke()  # the refill starts the next ones (at most SPAWN_AT_ONCE at a time)
        elif isinstance(msg, Done) and w.job is not None:
            job, w.job = w.job, None
            w.ran += 1
            job.end(code=msg.code, outcome=msg.outcome)
            limit = self.settings.max_tasks
            if w.doomed or (limit and w.ran >= limit):
                self._retire(w)
            else:
                self._idle_again(w)
            self._poke()
        else:
            raise ValueError(f"unexpected {type(msg).__name__}")

    def _idle_again(self, w: _Worker) -> None:
        w.idle_since = trio.current_time()
        self._idle.append(w)
        self._announce()


async def _receive(sock: trio.socket.SocketType, n: int) -> bytes | None:
    """Exactly ``n`` bytes from ``sock`` (None: it closed first)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]
