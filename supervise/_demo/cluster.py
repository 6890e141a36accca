"""The demo's node agents: real ``supervise node`` processes on loopback, started, killed and
replaced by PID, their logs kept on disk and read as they come.

The agents run under the supervise runtime (their output is read line by line as it comes);
their command line, the node loss, the PID book and the waiting are the local-cluster
harness's (``supervise._testing``)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import attrs
import trio

from supervise._demo.agentlog import NodeLog
from supervise._testing.cluster import kill_node, node_argv
from supervise._testing.poll import WaitTimeout, wait_until_async
from supervise._testing.procs import PidBook
from supervise.runtime import ExitReason, OsProcess, OutputLine, ProcessHandle

AGENT_SHUTDOWN_S = 30.0  # SIGTERM -> SIGKILL grace for an agent: it stops its workers first
WORKER_SHUTDOWN_S = 5.0  # the agents' --worker-shutdown


class DemoFailure(Exception):
    """The demo cannot go on: the message says what did not happen."""


@attrs.define(slots=True, eq=False)
class AgentProcess:
    """One incarnation of one node's agent."""

    rank: int
    incarnation: int  # 0: the original; 1, 2...: replacements after a node loss
    shm_dir: Path
    log_path: Path
    log: NodeLog
    handle: ProcessHandle | None = None
    exit: ExitReason | None = None
    killed: bool = False  # by the demo (a node loss): its exit is expected
    _sink: IO[str] | None = None

    @property
    def name(self) -> str:
        suffix = "" if self.incarnation == 0 else f" (replacement {self.incarnation})"
        return f"agent {self.rank}{suffix}"

    @property
    def pid(self) -> int:
        return -1 if self.handle is None else self.handle.pid


@attrs.frozen(slots=True)
class ClusterSpec:
    """How the agents are started: endpoints, policy, the training command (empty for farm
    nodes), more options, directories."""

    endpoints: tuple[str, ...]
    policy: Path
    command: tuple[str, ...]
    env: Mapping[str, str]
    run_dir: Path
    shm_root: Path
    options: tuple[str, ...] = ()  # more `supervise node` options (e.g. --tasks --cpus 2)

    @property
    def nodes(self) -> int:
        return len(self.endpoints)


class DemoCluster:
    """The running agents; every change to what their logs say wakes ``wait_for``."""

    def __init__(self, spec: ClusterSpec, book: PidBook) -> None:
        self.spec = spec
        self.book = book
        self.agents: list[AgentProcess] = []
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[DemoCluster] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Host the agents' processes until cancelled (cancelling stops every agent, in
        parallel: SIGTERM, then SIGKILL after the grace)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._scan_descendants)
            task_status.started(self)
            await trio.sleep_forever()

    def current(self, rank: int) -> AgentProcess:
        """The newest incarnation of node ``rank``'s agent."""
        return [a for a in self.agents if a.rank == rank][-1]

    @property
    def live(self) -> list[AgentProcess]:
        """The newest incarnation of every node."""
        return [
            self.current(r) for r in range(self.spec.nodes) if any(a.rank == r for a in self.agents)
        ]

    async def start_agent(self, rank: int) -> AgentProcess:
        """Start node ``rank``'s agent (a replacement if one ran before) with a fresh shm dir."""
        assert self._nursery is not None
        incarnation = sum(1 for a in self.agents if a.rank == rank)
        suffix = "" if incarnation == 0 else f"-{incarnation}"
        shm_dir = self.spec.shm_root / f"node{rank}{suffix}"
        shm_dir.mkdir(parents=True)
        cwd = self.spec.run_dir / f"node{rank}{suffix}"
        cwd.mkdir(parents=True)
        log_path = self.spec.run_dir / f"agent{rank}{suffix}.log"
        agent = AgentProcess(rank, incarnation, shm_dir, log_path, NodeLog(rank))
        argv = node_argv(
            rank=rank,
            endpoints=self.spec.endpoints,
            policy=self.spec.policy,
            shm_dir=shm_dir,
            worker_shutdown=WORKER_SHUTDOWN_S,
            command=self.spec.command,
            options=self.spec.options,
        )
        spec = OsProcess(
            argv,
            env=dict(self.spec.env),
            cwd=cwd,
            inherit_env=False,
            on_output=functools.partial(self._line, agent),
            log_output=False,
        )
        self.agents.append(agent)
        agent.handle = await self._nursery.start(self._host, agent, spec)
        self.book.add(agent.pid, f"agent (node {rank}, incarnation {incarnation})")
        return agent

    async def _host(
        self,
        agent: AgentProcess,
        spec: OsProcess,
        *,
        task_status: trio.TaskStatus[ProcessHandle] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with open(agent.log_path, "w", encoding="utf-8", buffering=1) as sink:
            agent._sink = sink
            try:
                agent.exit = await spec.run(
                    shutdown=AGENT_SHUTDOWN_S, label=agent.name, task_status=task_status
                )
            finally:
                agent._sink = None
                self._changed.set()

    def _line(self, agent: AgentProcess, line: OutputLine) -> None:
        if agent._sink is not None:
            agent._sink.write(line.text + "\n")
        before = len(agent.log.generations), agent.log.finished_at, agent.log.gave_up
        agent.log.feed(line.text)
        gen = agent.log.generation
        if gen is not None:
            for rank, pid in gen.pids.items():
                self.book.add(pid, f"worker (rank {rank}, generation {gen.number})")
        if before != (len(agent.log.generations), agent.log.finished_at, agent.log.gave_up):
            self.book.add_descendants(agent.pid, agent.name)
        self._changed.set()

    async def _scan_descendants(self) -> None:
        """Every half second, remember what runs under each agent (guards, workers)."""
        while True:
            for agent in self.agents:
                if agent.exit is None and not agent.killed:
                    self.book.add_descendants(agent.pid, agent.name)
            await trio.sleep(0.5)

    # -- faults ----------------------------------------------------------------------------

    def kill_node(self, rank: int) -> tuple[AgentProcess, list[int]]:
        """A node loss: SIGKILL its agent and its workers at once, drop its RAM (shm dir)."""
        agent = self.current(rank)
        self.book.add_descendants(agent.pid, agent.name)
        gen = agent.log.generation
        workers = [] if gen is None else sorted(gen.pids.values())
        agent.killed = True
        kill_node(agent.pid, workers, agent.shm_dir)
        return agent, workers

    # -- waiting ---------------------------------------------------------------------------

    async def wait_for(
        self,
        done: Callable[[], bool],
        *,
        limit_s: float,
        what: str,
        failed: Callable[[], str | None] | None = None,
    ) -> float:
        """Wait until ``done()``; DemoFailure after ``limit_s`` seconds or when ``failed()``
        (or the cluster's own health check) names a problem. Returns the seconds waited.
        Checks again whenever an agent's log changes (at least every half second)."""

        def check() -> bool:
            problem = self.problem() or (failed() if failed is not None else None)
            if done():
                return True
            if problem:
                raise DemoFailure(f"{problem} (while waiting for {what})")
            return False

        started = time.monotonic()
        try:
            await wait_until_async(
                check, what=what, timeout_s=limit_s, interval_s=0.5, wake=self._fresh_change
            )
        except WaitTimeout:
            raise DemoFailure(f"{what}: not within {limit_s:.0f} s") from None
        return time.monotonic() - started

    def _fresh_change(self) -> trio.Event:
        """A new event, set at the next change to what the agents' logs say."""
        self._changed = trio.Event()
        return self._changed

    def problem(self) -> str | None:
        """A node that gave up, or an agent that exited when it should not have."""
        for agent in self.live:
            if agent.log.gave_up:
                return f"node {agent.rank} gave up: {agent.log.gave_up}"
            if agent.exit is not None and not agent.killed and agent.log.finished_at is None:
                return (
                    f"{agent.name} (pid {agent.pid}) exited before training finished: {agent.exit}"
                )
        return None

    def all_workers(self) -> Sequence[int]:
        """Every worker PID any agent reported."""
        return sorted(
            {
                pid
                for a in self.agents
                for g in a.log.generations.values()
                for pid in g.pids.values()
            }
        )
