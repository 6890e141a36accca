"""Helpers shared by the cluster tests."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until ``predicate()`` holds (for state another process or the zmq I/O thread
    changes, where no trio event exists to wait on); fail after ``timeout`` seconds.
    """
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 (no event to wait on: polled state)
            await trio.sleep(0.005)


# ---- real node processes on loopback ---------------------------------------------------

import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

NODE_MAIN = Path(__file__).with_name("node_main.py")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (bound and released: a tiny race is possible)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


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
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def alive(self, rank: int) -> bool:
        return rank in self.procs and self.procs[rank].poll() is None

    def lines(self, rank: int) -> list[dict[str, Any]]:
        out = []
        for line in self.logs[rank].read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    async def wait_line(self, rank: int, kind: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109
        found: list[dict[str, Any]] = []

        def check() -> bool:
            if not self.alive(rank):
                raise AssertionError(f"node {rank} exited:\n{self.output(rank)[-3000:]}")
            found[:] = [x for x in self.lines(rank) if x.get("kind") == kind]
            return bool(found)

        await eventually(check, timeout)
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
