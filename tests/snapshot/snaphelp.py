"""Helpers for the snapshot tests: a minimal node agent hosting ArenaService behind zmq."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import zmq

from supervise.snapshot import ArenaService, MemoryBudget, RetentionRule


class ThreadedAgent:
    """ArenaService behind a zmq ROUTER served by one thread (the real agent uses trio)."""

    def __init__(self, service: ArenaService, endpoint: str) -> None:
        self.service = service
        self.endpoint = endpoint
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            ident, frame = self._sock.recv_multipart()
            reply = self.service.handle(frame)
            if reply is not None:
                self._sock.send_multipart([ident, reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close(linger=0)


def make_service(
    directory: Path,
    *,
    keep_last: int = 1,
    keep_best: int = 0,
    budget: int = 1 << 30,
    node: str = "n0",
    pinned_slots: int = 0,
) -> ArenaService:
    return ArenaService(
        directory,
        rule=RetentionRule(keep_last=keep_last, keep_best=keep_best),
        budget=MemoryBudget(budget),
        node=node,
        pinned_slots=pinned_slots,
    )


class Proc:
    """A child Python process, always cleaned up by PID."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        out, _ = self.popen.communicate(timeout=timeout)
        return self.popen.returncode, out

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
