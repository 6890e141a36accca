"""Processes for `recovery.py`: the training's progress file and a torchrun-style launcher
(the status quo). The supervise side runs on the local-cluster harness
(``supervise._testing.LocalCluster``), the waits on its polling helper.

Every process started here is tracked by PID and ended by PID (SIGTERM, then SIGKILL), also
when the benchmark fails; nothing is ever signalled by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervise._testing import free_port, send_signal, wait_until

# -- the training side's events ------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One line of the progress file (see ``supervise._demo.train.Progress``)."""

    ev: str
    t: float
    rank: int
    gen: int
    pid: int
    fields: Mapping[str, Any]

    @property
    def step(self) -> int | None:
        s = self.fields.get("step")
        return None if s is None else int(s)


class ProgressLog:
    """Follows a progress file that every worker of every generation appends to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[Event] = []
        self._offset = 0
        self._partial = b""
        path.touch()

    def poll(self) -> list[Event]:
        """Read what was appended since the last call; returns the new events."""
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            if not line.strip():
                continue
            d = json.loads(line)
            ev = Event(
                d.pop("ev"), float(d.pop("t")), int(d.pop("rank")), int(d.pop("gen")),
                int(d.pop("pid")), d,
            )  # fmt: skip
            new.append(ev)
        self.events.extend(new)
        return new

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll until ``predicate()`` holds; TimeoutError (``WaitTimeout``) naming ``what``
        otherwise."""

        def check() -> bool:
            self.poll()
            return predicate()

        wait_until(check, what=what, timeout_s=timeout, interval_s=0.02)

    def of(self, ev: str, *, gen: int | None = None, after: float | None = None) -> list[Event]:
        return [
            e
            for e in self.events
            if e.ev == ev and (gen is None or e.gen == gen) and (after is None or e.t >= after)
        ]

    @property
    def generation(self) -> int:
        """The newest generation that reported anything."""
        return max((e.gen for e in self.events), default=0)

    def current_step(self, ranks: Sequence[int]) -> int | None:
        """The last step every rank completed in the newest generation that stepped."""
        steps = self.of("step")
        if not steps:
            return None
        gen = steps[-1].gen
        last: dict[int, int] = {}
        for e in steps:
            if e.gen == gen and e.step is not None:
                last[e.rank] = max(last.get(e.rank, -1), e.step)
        if set(last) != set(ranks):
            return None
        return min(last.values())

    def step_at(self, t: float, ranks: Sequence[int]) -> int:
        """The training step the job stood at at time ``t``: the last step every rank of the
        generation then running had completed (-1: none yet)."""
        steps = [e for e in self.of("step") if e.t <= t]
        if not steps:
            return -1
        gen = steps[-1].gen
        last: dict[int, int] = {}
        for e in steps:
            if e.gen == gen and e.step is not None:
                last[e.rank] = max(last.get(e.rank, -1), e.step)
        if set(last) != set(ranks):
            # the newest generation has not stepped on every rank yet: the previous one counts
            older = [e for e in steps if e.gen < gen]
            if not older:
                return -1
            return self.step_at(older[-1].t, ranks)
        return min(last.values())

    def resumed(self, after_gen: int, ranks: Sequence[int]) -> tuple[int, dict[int, Event]] | None:
        """The first generation newer than ``after_gen`` in which every rank completed a step,
        with each rank's first step event in it."""
        firsts: dict[int, dict[int, Event]] = {}
        for e in self.of("step"):
            if e.gen > after_gen:
                firsts.setdefault(e.gen, {}).setdefault(e.rank, e)
        for gen in sorted(firsts):
            if set(firsts[gen]) >= set(ranks):
                return gen, firsts[gen]
        return None

    def worker_pids(self, gen: int) -> dict[int, int]:
        return {e.rank: e.pid for e in self.of("main", gen=gen)}

    def all_pids(self) -> set[int]:
        return {e.pid for e in self.events}


# -- the status quo: a torchrun-style launcher ---------------------------------------------


@dataclass
class LauncherEvent:
    t: float
    kind: str  # failure | stopped | spawned | finished | gave_up
    restart: int
    detail: Mapping[str, Any] = field(default_factory=dict)


class TorchrunLike:
    """What ``torchrun --nproc-per-node N --max-restarts R`` does for a job on one machine:
    start every worker with torchrun's environment; poll them every ``monitor_interval``
    seconds (torchrun's default 0.1); when any exits non-zero, stop all (SIGTERM, SIGCONT,
    SIGKILL after ``grace``) and start all again with TORCHELASTIC_RESTART_COUNT + 1, up to
    ``max_restarts`` times. It keeps no training state: the script checkpoints itself.

    Deviations, all in the status quo's favour: torchrun waits up to 30 s for a stopped
    (SIGSTOPped) worker to act on SIGTERM, this sends SIGCONT and waits ``grace``; and the
    rendezvous is a fresh MASTER_PORT on one host instead of a c10d store round.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        nproc: int,
        workdir: Path,
        env: Mapping[str, str],
        max_restarts: int = 100,
        grace: float = 5.0,
        monitor_interval: float = 0.1,
        before_restart: Callable[[], None] | None = None,
    ) -> None:
        self.command = list(command)
        self.nproc = nproc
        self.workdir = workdir
        self.env = dict(env)
        self.max_restarts = max_restarts
        self.grace = grace
        self.monitor_interval = monitor_interval
        self.before_restart = before_restart
        self.events: list[LauncherEvent] = []
        self.restart = 0
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.all_pids: set[int] = set()
        self.exit_code: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="torchrun-like", daemon=True)
        self._run_id = f"bench-{os.getpid()}-{int(time.time())}"

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        port = free_port()
        procs = {}
        for rank in range(self.nproc):
            env = {
                **os.environ,
                **self.env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "GROUP_RANK": "0",
                "ROLE_RANK": str(rank),
                "ROLE_NAME": "default",
                "WORLD_SIZE": str(self.nproc),
                "LOCAL_WORLD_SIZE": str(self.nproc),
                "ROLE_WORLD_SIZE": str(self.nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "TORCHELASTIC_RESTART_COUNT": str(self.restart),
                "TORCHELASTIC_MAX_RESTARTS": str(self.max_restarts),
                "TORCHELASTIC_RUN_ID": self._run_id,
                "PYTHONUNBUFFERED": "1",
            }
            env.pop("SUPERVISE_AGENT", None)
            log = self.workdir / f"worker{rank}-r{self.restart}.log"
            with open(log, "wb") as out:
                p = subprocess.Popen(
                    self.command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
                )
            procs[rank] = p
            self.all_pids.add(p.pid)
        with self._lock:
            self.procs = procs
        self.events.append(LauncherEvent(time.time(), "spawned", self.restart))

    def _run(self) -> None:
        while not self._stop.is_set():
            time.sleep(self.monitor_interval)
            with self._lock:
                codes = {r: p.poll() for r, p in self.procs.items()}
            failed = {r: c for r, c in codes.items() if c not in (None, 0)}
            if failed:
                detail = {str(r): c for r, c in failed.items()}
                self.events.append(LauncherEvent(time.time(), "failure", self.restart, detail))
                self._stop_all()
                self.events.append(LauncherEvent(time.time(), "stopped", self.restart))
                if self._stop.is_set():
                    return
                if self.restart >= self.max_restarts:
                    self.events.append(LauncherEvent(time.time(), "gave_up", self.restart))
                    self.exit_code = 1
                    return
                if self.before_restart is not None:
                    self.before_restart()
                self.restart += 1
                self._spawn()
            elif all(c == 0 for c in codes.values()):
                self.events.append(LauncherEvent(time.time(), "finished", self.restart))
                self.exit_code = 0
                return

    def _stop_all(self) -> None:
        with self._lock:
            procs = list(self.procs.values())
        for p in procs:
            if p.poll() is None:
                send_signal(p.pid, signal.SIGTERM)
                send_signal(p.pid, signal.SIGCONT)
        deadline = time.monotonic() + self.grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                send_signal(p.pid)
                p.wait()

    def worker_pid(self, rank: int) -> int:
        with self._lock:
            return self.procs[rank].pid

    def stop(self) -> None:
        self._stop.set()
        self._stop_all()
        self._thread.join(timeout=self.grace + 5.0)

    def wait(self, timeout: float) -> int | None:
        self._thread.join(timeout)
        return self.exit_code
