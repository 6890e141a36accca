"""A node's training processes for one generation: spawn them with torchrun's environment plus
supervise's, report each exit, stop them all (SIGTERM, SIGCONT for a stopped one, SIGKILL).

Workers are not restarted here: a worker's exit is a failure of the whole job (collectives
break on every rank), so the executor restarts every node's workers together, at one version,
with a new generation. For a Python command, spare processes that already imported the heavy
modules (``recovery.preload``) wait for the next generation (:class:`SparePool`), so a restart
skips the interpreter start and ``import torch``. Spares are forked from the node's template
process (`ForkServer`), or spawned while it is down.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import random
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import structlog
import trio
import trio.lowlevel

from supervise.agents._template import ForkServer
from supervise.runtime import (
    Backoff,
    ExitKind,
    ExitReason,
    GaveUp,
    OsProcess,
    OutputLine,
    ProcessHandle,
    Spawner,
    Supervisor,
    child,
    child_subreaper,
)
from supervise.runtime.private import write_private
from supervise.snapshot.protocol import AGENT_ENV, TOKEN_ENV

log = structlog.get_logger("supervise.agents.workers")

GENERATION_ENV = "SUPERVISE_GENERATION"
NODE_RANK_ENV = "SUPERVISE_NODE_RANK"
_PRELOAD_POLL = 0.1  # seconds between looks for a spare's "preloaded" marker
# A template that dies is restarted after a pause; more than this many deaths in this many
# seconds and spares are spawned for the rest of the agent's life.
_TEMPLATE_RESTARTS = (3, 300.0)
_TEMPLATE_BACKOFF = Backoff(initial=1.0, max=30.0)
# How long a restart waits for the spare being made (the template still importing) before it
# starts a worker cold: the cold import would compete with the template's for the same cores.
SPARE_WAIT = 30.0
# A spare runs supervise/_warm.py by its path: ``-m supervise._warm`` would first import the
# ``supervise`` package (0.4 s of CPU) in the main thread, at normal priority, while training
# runs; the warm-up imports it later, in its idle-class thread. Through ``-c``, not ``python
# _warm.py``: that would put supervise/ first on sys.path, where supervise/torch shadows torch.
_WARM_FILE = str(Path(__file__).resolve().parent.parent / "_warm.py")
_WARM_BOOT = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@attrs.frozen(slots=True)
class Launch:
    """What one generation of a node's workers is started with."""

    command: tuple[str, ...]
    node_rank: int
    nproc: int
    n_nodes: int
    generation: int
    master_addr: str
    master_port: int
    agent: str
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    # global rank -> its worker's token (secrets: never in a repr, a log line or an error)
    tokens: Mapping[int, str] = attrs.field(factory=dict, repr=False)

    def ranks(self) -> range:
        """The global ranks this node runs."""
        return range(self.node_rank * self.nproc, (self.node_rank + 1) * self.nproc)

    def environment(self, local_rank: int) -> dict[str, str]:
        """The variables a worker gets on top of the agent's own environment."""
        rank = self.node_rank * self.nproc + local_rank
        token = {TOKEN_ENV: self.tokens[rank]} if rank in self.tokens else {}
        return {
            **self.env,
            **token,
            "RANK": str(rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(self.n_nodes * self.nproc),
            "LOCAL_WORLD_SIZE": str(self.nproc),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            AGENT_ENV: self.agent,
            GENERATION_ENV: str(self.generation),
            NODE_RANK_ENV: str(self.node_rank),
            "PYTHONUNBUFFERED": "1",
        }


ExitCallback = Callable[[int, int, ExitReason], None]  # (rank, pid, reason)


class WorkerGroup:
    """Run one generation's workers: ``await nursery.start(group.run)``; ``await group.stop()``."""

    def __init__(
        self,
        launch: Launch,
        *,
        on_exit: ExitCallback,
        on_output: Callable[[OutputLine], None] | None = None,
        shutdown: float = 5.0,
        spares: SparePool | None = None,
    ) -> None:
        self.launch = launch
        self._on_exit = on_exit
        self._on_output = on_output
        self._shutdown = shutdown
        self._spares = spares
        self.warm: set[int] = set()  # ranks that run in a spare process
        self.forked: set[int] = set()  # those whose spare was forked from the template
        self.handles: dict[int, ProcessHandle] = {}
        self.exits: dict[int, ExitReason] = {}
        self._done = trio.Event()
        self._stopping = False

    @property
    def pids(self) -> dict[int, int]:
        """Global rank -> PID of every worker spawned."""
        return {rank: h.pid for rank, h in self.handles.items()}

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(
        self, *, task_status: trio.TaskStatus[WorkerGroup] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Spawn every worker (or wake a spare), report started, and return once all of them
        exited."""
        try:
            async with trio.open_nursery() as nursery:
                for local_rank, rank in enumerate(self.launch.ranks()):
                    label = f"worker rank {rank} gen {self.launch.generation}"
                    spare = (
                        await self._spares.take_soon(SPARE_WAIT)
                        if self._spares is not None
                        else None
                    )
                    if spare is not None:
                        try:
                            spare.wake(self.launch.environment(local_rank), label)
                        except OSError as exc:
                            log.warning("spare worker not used", pid=spare.pid, error=str(exc))
                            spare.handle.signal(signal.SIGKILL)
                        else:
                            self.handles[rank] = spare.handle
                            self.warm.add(rank)
                            if spare.forked:
                                self.forked.add(rank)
                            nursery.start_soon(self._adopted, spare.handle, rank)
                            continue
                    spec = OsProcess(
                        list(self.launch.command),
                        env=self.launch.environment(local_rank),
                        cwd=self.launch.cwd,
                        on_output=self._on_output,
                    )
                    self.handles[rank] = await nursery.start(
                        functools.partial(self._watch, spec, rank, label=label)
                    )
                task_status.started(self)
        finally:
            self._done.set()

    async def _watch(
        self,
        spec: OsProcess,
        rank: int,
        *,
        label: str,
        task_status: trio.TaskStatus[ProcessHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        reason = await spec.run(shutdown=self._shutdown, label=label, task_status=task_status)
        handle = self.handles.get(rank)
        self.exits[rank] = reason
        self._on_exit(rank, handle.pid if handle is not None else -1, reason)

    async def wait(self) -> None:
        """Return once every worker of this generation exited."""
        await self._done.wait()

    async def _adopted(self, handle: ProcessHandle, rank: int) -> None:
        """Follow a spare that became this generation's worker (its process task belongs to
        the pool; cancelling that task stops it)."""
        reason = await handle.wait()
        self.exits[rank] = reason
        self._on_exit(rank, handle.pid, reason)

    async def stop(self) -> None:
        """Stop every worker still running, concurrently; returns once all have exited."""
        self._stopping = True
        async with trio.open_nursery() as nursery:
            for rank, handle in self.handles.items():
                if rank not in self.exits:
                    nursery.start_soon(self._stop_one, handle)
        await self._done.wait()

    @staticmethod
    async def _stop_one(handle: ProcessHandle) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle.stop)
            await trio.lowlevel.checkpoint()  # let stop() send SIGTERM first
            with contextlib.suppress(OSError):
                handle.signal(
                    signal.SIGCONT
                )  # a stopped process acts on SIGTERM only once continued


def warm_target(command: tuple[str, ...]) -> list[str] | None:
    """What a spare runs after its go order, for ``python SCRIPT ...`` or ``python -m MODULE
    ...`` (any interpreter named python*); None for any other command (started cold)."""
    if len(command) < 2 or not Path(command[0]).name.startswith("python"):
        return None
    if command[1] == "-m":
        return list(command[1:]) if len(command) >= 3 else None
    if command[1].startswith("-"):
        return None  # interpreter options: run it exactly as given
    return list(command[1:])


class Spare:
    """A spare worker process waiting for its go order (a JSON file it polls for)."""

    def __init__(self, handle: ProcessHandle, go_file: Path, *, forked: bool = False) -> None:
        self.handle = handle
        self.go_file = go_file
        self.forked = forked  # from the template (else spawned: it imports on its own)
        self.taken = False
        self.spawned = trio.current_time()

    @property
    def preloaded(self) -> bool:
        """Whether it finished importing ``recovery.preload`` (a restart that takes it before
        then waits for the rest of those imports)."""
        return self.go_file.with_suffix(".warm").exists()

    @property
    def pid(self) -> int:
        return self.handle.pid

    def wake(self, env: Mapping[str, str], label: str) -> None:
        """Hand over the generation's environment: the spare becomes that worker."""
        tmp = self.go_file.with_suffix(".tmp")
        write_private(tmp, json.dumps({"env": dict(env)}))  # it carries the worker's token
        tmp.replace(self.go_file)
        self.handle.label = label


class SparePool:
    """Spare worker processes started ahead of the next restart (one per local worker).

    Only for Python commands and a non-empty ``preload``; every spare runs inside the
    nursery given to :meth:`fill`, so cancelling it (the node stops) stops the spares too.
    The first fill starts the template (``fork_server``, where the OS can adopt a forked
    process) under a small supervisor in that nursery and waits for its imports; spares are
    forked from it from then on, and spawned while it is down.
    """

    def __init__(
        self,
        command: tuple[str, ...],
        preload: tuple[str, ...],
        run_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_output: Callable[[OutputLine], None] | None = None,
        shutdown: float = 5.0,
        fork_server: bool = True,
    ) -> None:
        target = warm_target(command)
        self.enabled = bool(preload) and target is not None
        self._argv = [command[0] if target else sys.executable, "-c", _WARM_BOOT, _WARM_FILE]
        self.template: ForkServer | None = None
        if self.enabled and fork_server and child_subreaper() is not None:
            fd_arg = len(self._argv) + 1  # SOCKET_FD, after "--template"
            self.template = ForkServer(
                OsProcess(
                    [*self._argv, "--template", "-1", str(os.getpid()), ",".join(preload), "--"]
                    + (target or []),
                    env={**(env or {}), "PYTHONUNBUFFERED": "1"},
                    cwd=cwd,
                    on_output=on_output,
                ),
                fd_arg,
                shutdown=shutdown,
            )
        self._template_started = False
        self._filling = trio.Lock()
        self._target = target or []
        self._preload = ",".join(preload)
        self._run_dir = run_dir
        self._env = dict(env or {})
        self._cwd = cwd
        self._on_output = on_output
        self._shutdown = shutdown
        self._ready: list[Spare] = []
        self._changed = trio.Event()  # set (and replaced) when a spare is added or a fill ends
        self._ids = itertools.count()
        self._prefix = f"spare-{os.getpid()}-{secrets.token_hex(3)}"

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def pids(self) -> list[int]:
        """The PIDs of the spares waiting for a restart (`supervise status` lists them)."""
        return [spare.pid for spare in self._ready]

    def take(self) -> Spare | None:
        """A live spare, or None (the caller starts the worker cold)."""
        while self._ready:
            spare = self._ready.pop(0)
            if spare.handle.returncode is None and spare.handle.reason is None:
                spare.taken = True
                return spare
        return None

    async def take_soon(self, limit: float) -> Spare | None:
        """`take`, but while a spare is being made (the first fill waits for the template's
        imports) wait for it, up to ``limit`` seconds: a worker started cold meanwhile would
        import the same modules beside the template, on the same cores, and be ready no
        sooner (a replacement node's first restart comes while its template imports)."""
        with trio.move_on_after(limit):
            while self._filling.locked():
                changed = self._changed
                spare = self.take()
                if spare is not None:
                    return spare
                await changed.wait()
        return self.take()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def fill(self, nursery: trio.Nursery, count: int) -> None:
        """Start spares until ``count`` wait (a spawn failure is logged: cold starts then)."""
        async with self._filling:
            try:
                await self._fill(nursery, count)
            finally:
                self._notify()

    async def _fill(self, nursery: trio.Nursery, count: int) -> None:
        while self.enabled and len(self._ready) < count:
            go_file = self._run_dir / f"{self._prefix}-{next(self._ids)}.go"
            spec = OsProcess(
                [*self._argv, str(go_file), self._preload, "--", *self._target],
                env={**self._env, "PYTHONUNBUFFERED": "1"},
                cwd=self._cwd,
                on_output=self._on_output,
            )
            via = await self._fork_from_template(nursery, go_file)
            handle = None
            if via is not None:
                started = trio.current_time()
                try:
                    handle = await nursery.start(self._run_spare, spec, via)
                except OSError as exc:
                    log.warning("spare not forked: spawning it", error=str(exc))
                    via = None
                else:
                    ms = round((trio.current_time() - started) * 1000, 1)
                    assert self.template is not None
                    log.info(
                        "spare worker forked", pid=handle.pid, template=self.template.pid, ms=ms
                    )
            if handle is None:
                try:
                    handle = await nursery.start(self._run_spare, spec, None)
                except OSError as exc:
                    log.warning("could not start a spare worker", error=str(exc))
                    return
            spare = Spare(handle, go_file, forked=via is not None)
            self._ready.append(spare)
            self._notify()
            nursery.start_soon(self._forget_when_gone, spare)
            nursery.start_soon(self._report_preloaded, spare)

    async def _run_spare(
        self,
        spec: OsProcess,
        via: Spawner | None,
        *,
        task_status: trio.TaskStatus[ProcessHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await spec.run(
            shutdown=self._shutdown, label="spare worker", via=via, task_status=task_status
        )

    async def _fork_from_template(self, nursery: trio.Nursery, go_file: Path) -> Spawner | None:
        """How the next spare is started: forked by the template if it runs (the first call
        starts it and waits for its imports), else None (spawned)."""
        template = self.template
        if template is None:
            return None
        if not self._template_started:
            self._template_started = True
            nursery.start_soon(self._supervise_template, template)
            await template.settled()
        return functools.partial(template.fork, go_file) if template.up else None

    async def _supervise_template(self, template: ForkServer) -> None:
        """Keep the template running (restarted after a pause); past the restart intensity,
        spares are spawned for the rest of the agent's life."""
        restarts, seconds = _TEMPLATE_RESTARTS
        tree = Supervisor(
            [child(template.serve, id="spare-template")],
            max_restarts=restarts,
            max_seconds=seconds,
            backoff=_TEMPLATE_BACKOFF,
        )
        try:
            await tree.run()
        except GaveUp as exc:
            log.warning("spare template gave up: spares are spawned from now on", error=str(exc))
        finally:
            self.template = None

    @staticmethod
    async def _report_preloaded(spare: Spare) -> None:
        """Log when a spare has its imports done: from then on a restart skips them all."""
        while spare.handle.returncode is None and spare.handle.reason is None:
            if spare.preloaded:
                seconds = round(trio.current_time() - spare.spawned, 3)
                log.info(
                    "spare worker ready",
                    pid=spare.pid,
                    seconds=seconds,
                    taken=spare.taken,
                    forked=spare.forked,
                )
                return
            await trio.sleep(_PRELOAD_POLL)

    async def _forget_when_gone(self, spare: Spare) -> None:
        try:
            await spare.handle.wait()
        finally:
            for leftover in (spare.go_file, spare.go_file.with_suffix(".warm")):
                with contextlib.suppress(OSError):
                    leftover.unlink(missing_ok=True)  # an order it never read, its marker
        if spare in self._ready:  # died before it was used: the next restart starts cold
            self._ready.remove(spare)
            reason = spare.handle.reason
            log.warning("spare worker exited before use", pid=spare.pid, reason=str(reason))
            if reason is not None and reason.kind is not ExitKind.SHUTDOWN:
                # e.g. this interpreter cannot import supervise: do not spawn one per restart
                self.enabled = False
                log.warning("spare workers disabled: workers start cold from now on")


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOW_PORTS = 20000  # the search starts here, below the usual ephemeral range (32768-60999)


def _ephemeral_low(path: str = _EPHEMERAL_RANGE) -> int | None:
    """The first port the kernel hands out to outgoing connections (None: unknown)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
        return True


def free_port(host: str, *, ephemeral_low: int | None = None) -> int:
    """A TCP port free on ``host`` right now (for a fresh rendezvous each generation).

    Chosen below the kernel's ephemeral range when there is room: the workers bind it seconds
    later (after importing torch), and a port from the ephemeral range may meanwhile become
    the local end of any outgoing connection on the machine (then: EADDRINUSE).
    """
    low = _ephemeral_low() if ephemeral_low is None else ephemeral_low
    if low is not None and low - _LOW_PORTS >= 1000:
        rng = random.Random()
        for _ in range(64):
            port = rng.randrange(_LOW_PORTS, low)
            if _bindable(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
