"""Processes by PID: free loopback ports, signals that tolerate a process already gone, and a
book of every process seen, by PID and start time, to prove at the end that none is left.

A PID alone is not an identity (the kernel reuses them); the start time in ``/proc/<pid>/stat``
tells a reused PID apart from the process that was seen. Nothing here finds a process by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path

import attrs

from supervise._testing.poll import WaitTimeout, wait_until
from supervise.runtime.procfs import stat_fields

_PROC = Path("/proc")

# Command-line fragments that say what a descendant of an agent is.
WORKER_MARKERS: tuple[bytes, ...] = (b"supervise._demo.train", b"fake_worker.py")
GUARD_MARKER = b"os.killpg"  # the runtime's guard process (python -S -c ...)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (bound together, then released: another
    process may take one in between, a tiny race every loopback test accepts)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """One free TCP port on loopback (see ``free_ports``)."""
    return free_ports(1)[0]


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start ticks) of a process, None if it is gone."""
    try:
        rest = stat_fields(pid)
    except OSError:
        return None
    return rest[0], int(rest[1]), int(rest[19])


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and runs code (a zombie or a dead task counts as gone)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in "ZX"


def send_signal(pid: int, signum: int = signal.SIGKILL) -> bool:
    """Signal ``pid``; False when it is already gone (or not ours to signal)."""
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def sweep(pids: Iterable[int], grace_s: float = 5.0) -> list[int]:
    """Wait up to ``grace_s`` for ``pids`` to be gone; SIGKILL those still there. Returns the
    ones that had to be killed (orphans)."""
    todo = set(pids)
    with contextlib.suppress(WaitTimeout):
        wait_until(
            lambda: not any(pid_alive(p) for p in todo),
            what=f"processes {sorted(todo)} to exit",
            timeout_s=grace_s,
        )
    orphans = sorted(p for p in todo if pid_alive(p))
    for p in orphans:
        send_signal(p)
    return orphans


def _children_by_parent() -> dict[int, list[int]]:
    by_parent: dict[int, list[int]] = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        stat = proc_stat(int(entry.name))
        if stat is not None:
            by_parent.setdefault(stat[1], []).append(int(entry.name))
    return by_parent


def descendants(pid: int) -> list[int]:
    """The PIDs of every live descendant of ``pid`` (children first, then theirs)."""
    by_parent = _children_by_parent()
    out: list[int] = []
    todo = list(by_parent.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(by_parent.get(child, []))
    return out


def _kind(pid: int) -> str:
    """What a descendant of an agent is, from its command line."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "process"
    if any(marker in raw for marker in WORKER_MARKERS):
        return "worker"
    if GUARD_MARKER in raw:
        return "guard"
    return "process"


@attrs.frozen(slots=True)
class SeenProcess:
    """A process that was seen: its PID, its start time (clock ticks after boot), its role."""

    pid: int
    start_ticks: int
    role: str


class PidBook:
    """The processes seen (agents, workers, their guards), each by PID and start time."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], SeenProcess] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, pid: int, role: str) -> None:
        """Remember ``pid`` (if it still runs: a process already gone cannot be left over)."""
        stat = proc_stat(pid)
        if stat is None:
            return
        key = (pid, stat[2])
        if key not in self._seen:
            self._seen[key] = SeenProcess(pid, stat[2], role)

    def add_descendants(self, pid: int, role: str) -> None:
        """Remember every live descendant of ``pid`` (workers, guards, their children)."""
        by_parent = _children_by_parent()
        todo = list(by_parent.get(pid, []))
        while todo:
            child = todo.pop()
            if not any(s.pid == child for s in self._seen.values()):
                self.add(child, f"{_kind(child)} (under {role})")
            todo.extend(by_parent.get(child, []))

    def survivors(self) -> list[SeenProcess]:
        """The processes seen that still run (zombies count as gone: they run no code)."""
        alive = []
        for seen in self._seen.values():
            stat = proc_stat(seen.pid)
            if stat is not None and stat[2] == seen.start_ticks and stat[0] not in "ZX":
                alive.append(seen)
        return sorted(alive, key=lambda s: s.pid)

    def kill_survivors(self, signum: int = signal.SIGKILL) -> list[SeenProcess]:
        """Signal every survivor (each checked by start time first); returns them."""
        left = self.survivors()
        for seen in left:
            send_signal(seen.pid, signum)
        return left

    def roles(self) -> dict[str, int]:
        """How many processes of each kind were seen (for the report)."""
        counts: dict[str, int] = {}
        for seen in self._seen.values():
            kind = seen.role.split(" ", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts
