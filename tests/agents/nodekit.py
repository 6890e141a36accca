"""Run real node agents on loopback for tests: start, read their JSON logs, inject faults, and
clean up every process by PID (agents and the workers they reported)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
FAKE_WORKER = HERE / "fake_worker.py"

FAST_POLICY = """
[snapshot]
every_steps = 5
[retention]
keep_last = 2
[recovery]
max_attempts = 4
heartbeat_timeout = 3.0
startup_timeout = 30.0
preload = ["json"]  # spares: the restart path of a warm worker, without torch's import cost
[recovery.backoff]
initial = 0.05
max = 0.5
jitter = 0.0
reset_after = 2.0
[cluster]
heartbeat_interval = 0.2
peer_timeout = 2.0
rejoin_timeout = 60.0
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Agent:
    def __init__(self, proc: subprocess.Popen[bytes], rank: int, log: Path) -> None:
        self.proc = proc
        self.rank = rank
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError), self.log.open() as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class Nodes:
    """A cluster of node agents on loopback, all of whose processes are reaped by PID."""

    def __init__(
        self,
        tmp: Path,
        n: int,
        *,
        policy: str = FAST_POLICY,
        worker: list[str] | None = None,
        env: dict[str, str] | None = None,
        steps: int = 120,
    ) -> None:
        self.tmp = tmp
        self.n = n
        self.ports = free_ports(n)
        self.nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.policy = tmp / "policy.toml"
        self.policy.write_text(policy)
        self.faults = tmp / "faults"
        self.faults.mkdir(exist_ok=True)
        self.out = tmp / "out"
        self.worker = worker or [
            sys.executable,
            str(FAKE_WORKER),
            "--faults",
            str(self.faults),
            "--out",
            str(self.out),
            "--steps",
            str(steps),
        ]
        self.env = env or {}
        self.agents: dict[int, Agent] = {}
        self.incarnations: dict[int, int] = {}
        self.seen_pids: set[int] = set()

    def shm(self, rank: int) -> Path:
        return self.tmp / f"shm{rank}-{self.incarnations.get(rank, 0)}"

    def start(self, rank: int) -> Agent:
        inc = self.incarnations.get(rank, -1) + 1
        self.incarnations[rank] = inc
        shm = self.shm(rank)
        shm.mkdir(parents=True, exist_ok=True)
        log = self.tmp / f"node{rank}-{inc}.log"
        cmd = [
            sys.executable,
            "-m",
            "supervise",
            "node",
            "--rank",
            str(rank),
            "--nodes",
            self.nodes,
            "--policy",
            str(self.policy),
            "--shm-dir",
            str(shm),
            "--worker-shutdown",
            "2",
            "--",
            *self.worker,
        ]
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        agent = Agent(proc, rank, log)
        self.agents[rank] = agent
        self.seen_pids.add(proc.pid)
        return agent

    def start_all(self) -> None:
        for r in range(self.n):
            self.start(r)

    # -- reading ---------------------------------------------------------------------------

    def events(self, rank: int, name: str | None = None) -> list[dict[str, Any]]:
        evs = self.agents[rank].events()
        for e in evs:
            pids = e.get("pids")
            if isinstance(pids, dict):
                self.seen_pids.update(int(v) for v in pids.values())
            if e.get("event") == "process_started" and isinstance(e.get("pid"), int):
                self.seen_pids.add(e["pid"])  # workers and spares
        return [e for e in evs if name is None or e.get("event") == name]

    def wait(
        self, what: str, cond: Callable[[], Any], timeout: float = 90.0, interval: float = 0.1
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{self.dump()}")

    def resumed(self, rank: int, generation: int) -> bool:
        return any(e.get("generation") == generation for e in self.events(rank, "training resumed"))

    def wait_resumed(self, generation: int, timeout: float = 90.0) -> int:
        """Wait until every node resumed training at ``generation`` or a later one (a
        recovery may take several attempts); returns that generation."""

        def done() -> int | None:
            gens = [
                {e.get("generation", 0) for e in self.events(r, "training resumed")}
                for r in self.agents
            ]
            common = set.intersection(*gens) if gens else set()
            later = [g for g in common if g >= generation]
            return max(later) if later else None

        got: int = self.wait(f"generation >= {generation} resumed on every node", done, timeout)
        return got

    def worker_pid(self, rank: int) -> int:
        started = self.events(rank, "workers started")
        assert started, f"node {rank} started no workers"
        pids = started[-1]["pids"]
        return int(next(iter(pids.values())))

    def recoveries(self, rank: int = 0) -> list[dict[str, Any]]:
        return self.events(rank, "recovery")

    def fault(self, kind: str, rank: int) -> None:
        (self.faults / f"{kind}-rank{rank}").touch()

    def wait_exit(self, rank: int, timeout: float = 90.0) -> int:
        proc = self.agents[rank].proc
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {rank} did not exit\n{self.dump()}") from None

    def dump(self) -> str:
        parts = []
        for rank, a in sorted(self.agents.items()):
            lines = a.log.read_text(errors="replace").splitlines() if a.log.exists() else []
            lines = [ln for ln in lines if '"replica stored"' not in ln and '"pushed"' not in ln]
            lines = lines[-60:]
            parts.append(f"--- node {rank} (pid {a.pid}) ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- cleanup ---------------------------------------------------------------------------

    def kill_all(self) -> None:
        for rank in self.agents:
            with contextlib.suppress(Exception):
                self.events(rank)
        for pid in self.seen_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for a in self.agents.values():
            with contextlib.suppress(Exception):
                a.proc.wait(10)

    def orphans(self) -> list[int]:
        """Every PID this cluster ever had that is still alive."""
        for rank in self.agents:
            self.events(rank)
        return sorted(pid for pid in self.seen_pids if pid_alive(pid))


@contextlib.contextmanager
def nodes(tmp: Path, n: int, **kwargs: Any) -> Iterator[Nodes]:
    cluster = Nodes(tmp, n, **kwargs)
    try:
        yield cluster
    except BaseException:
        print(cluster.dump())  # pytest shows it with the failure
        raise
    finally:
        cluster.kill_all()
