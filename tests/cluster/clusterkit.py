"""Helpers shared by the cluster tests."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervise._testing import free_ports, read_json_lines, send_signal, wait_until_async

__all__ = ["NodeProcs", "eventually", "free_ports"]


def _describe(predicate: Callable[[], object]) -> str:
    """The predicate's source line (a lambda) or its name, for a timeout's message."""
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return getattr(predicate, "__qualname__", repr(predicate))


async def eventually(
    predicate: Callable[[], object],
    timeout: float = 10.0,  # noqa: ASYNC109 (a deadline for polled state, not a cancel scope)
    *,
    what: str = "a condition",
) -> None:
    """Wait until ``predicate()`` holds (for state another process or the zmq I/O thread
    changes, where no trio event exists to wait on); ``WaitTimeout`` after ``timeout``
    seconds, naming ``what`` and quoting the predicate's source.
    """
    await wait_until_async(
        predicate,
        what=what,
        timeout_s=timeout,
        interval_s=0.005,
        details=lambda: f"the condition: {_describe(predicate)}",
    )


# ---- real node processes on loopback ---------------------------------------------------

NODE_MAIN = Path(__file__).with_name("node_main.py")


class NodeProcs:
    """Node processes of one test; every one is killed by PID when the test ends."""

    def __init__(self, workdir: Path, n: int) -> None:
        self.workdir = workdir
        self.endpoints = [f"127.0.0.1:{p}" for p in free_ports(n)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}
        self._starts = 0

    def start(self, rank: int, *args: str) -> subprocess.Popen[bytes]:
        self._starts += 1
        log = self.workdir / f"node-{rank}-{self._starts}.log"
        self.logs[rank] = log
        argv = [
            sys.executable,
            str(NODE_MAIN),
            "--rank",
            str(rank),
            "--nodes",
            ",".join(self.endpoints),
            *args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.procs[rank] = proc
        return proc

    def kill(self, rank: int) -> None:
        """SIGKILL by PID, then reap."""
        proc = self.procs.pop(rank)
        if proc.poll() is None:
            send_signal(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def alive(self, rank: int) -> bool:
        return rank in self.procs and self.procs[rank].poll() is None

    def lines(self, rank: int) -> list[dict[str, Any]]:
        return read_json_lines(self.logs[rank])

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    async def wait_line(self, rank: int, kind: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        found: list[dict[str, Any]] = []

        def check() -> bool:
            if not self.alive(rank):
                raise AssertionError(f"node {rank} exited:\n{self.output(rank)[-3000:]}")
            found[:] = [x for x in self.lines(rank) if x.get("kind") == kind]
            return bool(found)

        await eventually(check, timeout, what=f"node {rank} to log {kind!r}")
        return found[0]

    def cleanup(self) -> None:
        """Kill what still runs (by PID) and print each log's tail: pytest shows it when the
        test failed, which is when it is needed.
        """
        for rank in list(self.procs):
            self.kill(rank)
        for rank, log in sorted(self.logs.items()):
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print(f"---- node {rank} ({log.name}) ----", *tail, sep="\n")
