"""A local cluster: real ``supervise node`` agents on free loopback ports, for tests, the demo
and the benchmarks.

``LocalCluster`` starts agents (replacements too, each with RAM of its own: a fresh shm dir),
reads their JSON logs, injects faults (kill -9 of a worker or of a whole node, SIGSTOP, the
training scripts' fault files), waits on conditions with deadlines (``poll.wait_until``), and
cleans up by PID, never by name: every agent it started and every worker PID the agents
reported, each checked by start time before it is signalled. Used as a context manager, it
prints every agent's log tail when the block fails (pytest shows it with the failure) and
cleans up either way.

The pieces an asynchronous host needs (the demo runs its agents under the supervise runtime)
are functions: ``node_argv``, ``kill_node``, ``fault_file``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from supervise._testing.poll import wait_until
from supervise._testing.procs import PidBook, free_ports, send_signal, sweep

T = TypeVar("T")

AGENT_GRACE_S = 30.0  # SIGTERM -> SIGKILL for an agent: it stops its workers first
DEFAULT_WAIT_S = 90.0
# Lines too frequent to help in a failure's log tail.
NOISY_EVENTS = ('"replica stored"', '"pushed"')


def node_argv(
    *,
    rank: int | None = None,
    standby: str | None = None,
    endpoints: Sequence[str],
    policy: Path,
    shm_dir: Path,
    worker_shutdown: float,
    command: Sequence[str],
    options: Sequence[str] = (),
) -> list[str]:
    """The command line of node ``rank``'s agent, or of a hot standby agent listening at
    ``standby`` (give one): ``supervise node ... [options] -- command`` (no ``--`` when
    ``command`` is empty: a farm node, ``--tasks`` among the options)."""
    if (rank is None) == (standby is None):
        raise ValueError("node_argv: give either rank or standby")
    seat = ["--rank", str(rank)] if standby is None else ["--standby", standby]
    return [
        sys.executable, "-m", "supervise", "node",
        *seat,
        "--nodes", ",".join(endpoints),
        "--policy", str(policy),
        "--shm-dir", str(shm_dir),
        "--worker-shutdown", str(worker_shutdown),
        *options,
        *(("--", *command) if command else ()),  # no command: a farm node (--tasks)
    ]  # fmt: skip


def kill_node(agent_pid: int, workers: Iterable[int], shm_dir: Path | None) -> None:
    """A node loss: SIGKILL its agent and its workers at once, drop its RAM (the shm dir)."""
    for pid in [agent_pid, *workers]:
        send_signal(pid, signal.SIGKILL)
    if shm_dir is not None:
        shutil.rmtree(shm_dir, ignore_errors=True)


def fault_file(faults_dir: Path, kind: str, rank: int) -> Path:
    """Create the training scripts' fault file (``<kind>-rank<rank>``: ``nan``, ``crash``,
    ``hang``...); the worker of ``rank`` acts on it at its next step. Returns its path."""
    path = faults_dir / f"{kind}-rank{rank}"
    path.touch()
    return path


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of a log (other lines, a line still being written: skipped)."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        for raw in f:
            if not raw.lstrip().startswith(b"{"):
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if isinstance(entry, dict):
                    out.append(entry)
    return out


class Agent:
    """One incarnation of one node's agent: its process, its log, its RAM."""

    def __init__(
        self,
        rank: int,
        incarnation: int,
        proc: subprocess.Popen[bytes],
        log: Path,
        shm_dir: Path,
    ) -> None:
        self.rank = rank
        self.incarnation = incarnation  # 0: the original; 1, 2...: replacements
        self.proc = proc
        self.log = log
        self.shm_dir = shm_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def lines(self) -> list[dict[str, Any]]:
        """The agent's JSON log lines so far."""
        return read_json_lines(self.log)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Its log lines whose ``event`` is ``name`` (every line: None)."""
        return [x for x in self.lines() if name is None or x.get("event") == name]

    def worker_pids(self, generation: int | None = None) -> dict[int, int]:
        """Global rank -> PID of the workers it started for ``generation`` (None: newest)."""
        started = [
            x
            for x in self.events("workers started")
            if generation is None or x.get("generation") == generation
        ]
        if not started:
            return {}
        return {int(r): int(p) for r, p in started[-1]["pids"].items()}

    def tail(self, n: int = 60, *, skip: Sequence[str] = NOISY_EVENTS) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [x for x in text.splitlines() if x.strip() and not any(s in x for s in skip)]
        return "\n".join(line[:400] for line in lines[-n:])


class LocalCluster:
    """``supervise node`` agents of one run on loopback, all cleaned up by PID.

    ``command``: the training command every agent supervises; ``policy``: the policy file's
    text (written to ``workdir``) or a path. ``env``: the agents' environment (added to this
    process's, unless ``inherit_env`` is False). Files: ``workdir/agent<rank>-<n>.log``
    (stdout and stderr of incarnation n) and ``shm_root/node<rank>-<n>`` (its RAM).
    """

    def __init__(
        self,
        workdir: Path,
        n: int,
        *,
        command: Sequence[str],
        policy: str | Path,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        worker_shutdown: float = 2.0,
        shm_root: Path | None = None,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        self.workdir = workdir
        self.n = n
        self.endpoints = [f"127.0.0.1:{p}" for p in free_ports(n)]
        if isinstance(policy, Path):
            self.policy = policy
        else:
            self.policy = workdir / "policy.toml"
            self.policy.write_text(policy)
        self.command = list(command)
        self.env = dict(env or {})
        self.inherit_env = inherit_env
        self.worker_shutdown = worker_shutdown
        self.shm_root = shm_root if shm_root is not None else workdir
        self.wait_s = wait_s
        self.options: list[str] = []  # more ``supervise node`` options for the next starts
        self.agents: dict[int, Agent] = {}  # rank -> its newest incarnation
        self.standbys: list[Agent] = []  # standby agents not (yet) seen taking a rank
        self.started: list[Agent] = []  # every incarnation, in start order
        self.book = PidBook()

    @property
    def nodes(self) -> str:
        """The ``--nodes`` value: every endpoint, comma-separated."""
        return ",".join(self.endpoints)

    # -- starting --------------------------------------------------------------------------

    def shm(self, rank: int) -> Path:
        """The shm dir (RAM) of ``rank``'s newest agent."""
        return self.agents[rank].shm_dir

    def start(self, rank: int, *, keep_ram: bool = False) -> Agent:
        """Start ``rank``'s agent (a replacement, with a fresh shm dir, if one ran before;
        ``keep_ram``: the previous incarnation's shm dir, as an agent restarted in place)."""
        incarnation = sum(1 for a in self.started if a.rank == rank)
        if keep_ram and rank in self.agents:
            shm_dir = self.agents[rank].shm_dir
        else:
            shm_dir = self.shm_root / f"node{rank}-{incarnation}"
            shm_dir.mkdir(parents=True)
        log = self.workdir / f"agent{rank}-{incarnation}.log"
        argv = node_argv(
            rank=rank,
            endpoints=self.endpoints,
            policy=self.policy,
            shm_dir=shm_dir,
            worker_shutdown=self.worker_shutdown,
            command=self.command,
            options=self.options,
        )
        agent = Agent(rank, incarnation, self._spawn(argv, log), log, shm_dir)
        self.agents[rank] = agent
        self.started.append(agent)
        self.book.add(agent.pid, f"agent (node {rank}, incarnation {incarnation})")
        return agent

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start an agent process, its output to ``log``."""
        env = {**os.environ, **self.env} if self.inherit_env else dict(self.env)
        with log.open("wb") as out:
            return subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )

    def start_standby(self) -> Agent:
        """Start a hot standby agent (``--standby``, rank -1 until it takes one) on a free
        port, with a shm dir of its own."""
        index = sum(1 for a in self.started if a.log.name.startswith("standby-"))
        shm_dir = self.shm_root / f"standby-{index}"
        shm_dir.mkdir(parents=True)
        log = self.workdir / f"standby-{index}.log"
        argv = node_argv(
            standby=f"127.0.0.1:{free_ports(1)[0]}",
            endpoints=self.endpoints,
            policy=self.policy,
            shm_dir=shm_dir,
            worker_shutdown=self.worker_shutdown,
            command=self.command,
            options=self.options,
        )
        agent = Agent(-1, 0, self._spawn(argv, log), log, shm_dir)
        self.standbys.append(agent)
        self.started.append(agent)
        self.book.add(agent.pid, f"standby agent {index}")
        return agent

    def took_over(self, standby: Agent) -> int | None:
        """The rank ``standby`` took over (it is then that rank's newest agent), or None."""
        lines = standby.events("standby takes over")
        if not lines:
            return None
        rank = int(lines[-1]["node"])
        if standby in self.standbys:
            self.standbys.remove(standby)
            standby.rank = rank
            self.agents[rank] = standby
        return rank

    def wait_took_over(self, standby: Agent, timeout: float | None = None) -> int:
        """Wait until ``standby`` took a rank over; returns that rank."""

        def taken() -> tuple[int] | None:
            rank = self.took_over(standby)
            return None if rank is None else (rank,)  # rank 0 is a rank taken, not a miss

        return self.wait("a standby to take over a rank", taken, timeout)[0]

    def start_all(self) -> list[Agent]:
        return [self.start(rank) for rank in range(self.n)]

    # -- reading ---------------------------------------------------------------------------

    def events(self, rank: int, name: str | None = None) -> list[dict[str, Any]]:
        """``rank``'s newest agent's log lines named ``name`` (every line: None); notes every
        process they report, for the cleanup."""
        agent = self.agents[rank]
        lines = agent.lines()
        self._note(agent, lines)
        return [x for x in lines if name is None or x.get("event") == name]

    def all_events(self, name: str | None = None) -> list[tuple[Agent, dict[str, Any]]]:
        """Every incarnation's log lines named ``name``, with the agent that wrote each."""
        out = []
        for agent in self.started:
            lines = agent.lines()
            self._note(agent, lines)
            out += [(agent, x) for x in lines if name is None or x.get("event") == name]
        return out

    def _note(self, agent: Agent, lines: list[dict[str, Any]]) -> None:
        for x in lines:
            pids = x.get("pids")
            if x.get("event") == "workers started" and isinstance(pids, dict):
                for rank, pid in pids.items():
                    self.book.add(int(pid), f"worker (rank {rank}, under {agent.rank})")
            elif x.get("event") == "process_started" and isinstance(x.get("pid"), int):
                self.book.add(int(x["pid"]), f"{x.get('child')} (under {agent.rank})")

    def worker_pid(self, rank: int, generation: int | None = None) -> int:
        """The PID of the worker ``rank``'s newest agent started for ``generation`` (None:
        the newest it started); waits for the line."""
        agent = self.agents[rank]

        def found() -> int | None:
            self.events(rank)
            pids = agent.worker_pids(generation)
            return next(iter(pids.values())) if pids else None

        which = "its workers" if generation is None else f"generation {generation}"
        return self.wait(f"node {rank} to start {which}", found)

    def resumed(self, rank: int, generation: int) -> bool:
        """Whether ``rank``'s newest agent logged training resumed at ``generation``."""
        return any(x.get("generation") == generation for x in self.events(rank, "training resumed"))

    def wait_resumed(self, generation: int, timeout: float | None = None) -> int:
        """Wait until every node resumed training at ``generation`` or a later one (a recovery
        may take several attempts); returns that generation."""

        def done() -> int | None:
            gens = [
                {x.get("generation", 0) for x in self.events(r, "training resumed")}
                for r in self.agents
            ]
            common = set.intersection(*gens) if gens else set()
            later = [g for g in common if g >= generation]
            return max(later) if later else None

        return self.wait(f"generation >= {generation} resumed on every node", done, timeout)

    def dump(self, n: int = 60) -> str:
        """Every incarnation's log tail (the newest lines, without the noisy ones)."""
        return "\n".join(
            f"---- node {a.rank} (pid {a.pid}, {a.log.name}) ----\n{a.tail(n)}"
            for a in self.started
        )

    # -- waiting ---------------------------------------------------------------------------

    def wait(
        self,
        what: str,
        condition: Callable[[], T | None],
        timeout: float | None = None,
        interval_s: float = 0.1,
    ) -> T:
        """``poll.wait_until`` whose timeout quotes every agent's log tail."""
        return wait_until(
            condition,
            what=what,
            timeout_s=self.wait_s if timeout is None else timeout,
            interval_s=interval_s,
            details=self.dump,
        )

    def wait_exit(self, rank: int | Agent, timeout: float | None = None) -> int:
        """Wait for an agent (``rank``'s newest, or the one given) to exit; its exit code."""
        agent = self.agents[rank] if isinstance(rank, int) else rank
        try:
            return agent.proc.wait(self.wait_s if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"node {agent.rank} (pid {agent.pid}) did not exit\n{self.dump()}"
            ) from None

    def wait_all_exit(self, timeout: float) -> dict[int, int]:
        """Wait for every node's newest agent to exit on its own; rank -> exit code."""
        self.wait(
            "every agent to exit",
            lambda: all(a.proc.poll() is not None for a in self.agents.values()),
            timeout,
        )
        return {rank: int(a.proc.returncode) for rank, a in self.agents.items()}

    # -- faults ----------------------------------------------------------------------------

    def signal_worker(self, rank: int, signum: int) -> int:
        """Send ``signum`` to the newest worker of ``rank``'s agent; returns its PID."""
        pid = self.worker_pid(rank)
        if not send_signal(pid, signum):
            raise ProcessLookupError(f"worker of node {rank} (pid {pid}) is gone")
        return pid

    def crash_worker(self, rank: int) -> int:
        """kill -9 of ``rank``'s newest worker; returns its PID."""
        return self.signal_worker(rank, signal.SIGKILL)

    def hang_worker(self, rank: int) -> int:
        """SIGSTOP of ``rank``'s newest worker (alive, silent); returns its PID."""
        return self.signal_worker(rank, signal.SIGSTOP)

    def kill_agent(self, rank: int | Agent) -> Agent:
        """kill -9 of an agent (its guard takes its workers down with it), reaped."""
        agent = self.agents[rank] if isinstance(rank, int) else rank
        send_signal(agent.pid, signal.SIGKILL)
        agent.proc.wait(timeout=30)
        return agent

    def kill_node(self, rank: int, *, wipe_ram: bool = True) -> tuple[Agent, list[int]]:
        """A node loss: kill -9 of ``rank``'s agent and the workers it reported at once, and
        (``wipe_ram``) its shm dir removed. Returns the agent (reaped) and those workers."""
        agent = self.agents[rank]
        self.events(rank)
        workers = sorted(agent.worker_pids().values())
        kill_node(agent.pid, workers, agent.shm_dir if wipe_ram else None)
        agent.proc.wait(timeout=30)
        return agent, workers

    def send(self, rank: int | Agent, signum: int) -> None:
        """Send ``signum`` to an agent (``rank``'s newest, or the one given)."""
        agent = self.agents[rank] if isinstance(rank, int) else rank
        send_signal(agent.pid, signum)

    # -- stopping and cleaning up ----------------------------------------------------------

    def stop(self, grace_s: float = AGENT_GRACE_S) -> dict[int, int]:
        """SIGTERM every node's newest agent (each stops its workers in order), SIGKILL the
        ones still running after ``grace_s``; rank -> exit code."""
        for a in [*self.agents.values(), *self.standbys]:
            if a.running:
                send_signal(a.pid, signal.SIGTERM)
        for a in self.standbys:  # never needed: they only wait
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.proc.wait(grace_s)
        codes = {}
        for rank, a in self.agents.items():
            try:
                codes[rank] = a.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                send_signal(a.pid, signal.SIGKILL)
                codes[rank] = a.proc.wait()
        return codes

    def pids(self) -> set[int]:
        """Every agent PID this cluster started."""
        return {a.pid for a in self.started}

    def orphans(self) -> list[int]:
        """Every process of this cluster (agents, the workers and spares they reported) that
        still runs."""
        self.all_events()
        return sorted({s.pid for s in self.book.survivors()})

    def sweep(self, extra: Iterable[int] = (), grace_s: float = 5.0) -> list[int]:
        """Wait up to ``grace_s`` for every process of this cluster (and ``extra``) to be
        gone, SIGKILL those left; returns them."""
        self.all_events()
        return sweep({s.pid for s in self.book.survivors()} | set(extra), grace_s)

    def cleanup(self) -> None:
        """SIGKILL every agent still running (reaped), then every process it had (workers,
        spares, guards), each by PID and start time. Safe to call more than once."""
        with contextlib.suppress(Exception):
            self.all_events()
        for a in self.started:
            if a.running:
                self.book.add_descendants(a.pid, f"agent {a.rank}")
        for a in self.started:
            if a.running:
                send_signal(a.pid, signal.SIGKILL)
        self.book.kill_survivors()
        for a in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                a.proc.wait(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None:
                print(self.dump())  # pytest shows it with the failure
        finally:
            self.cleanup()
