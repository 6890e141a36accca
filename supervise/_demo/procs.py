"""Every process the demo saw, by PID and start time, to prove at the end that none is left.

A PID alone is not an identity (the kernel reuses them); the start time in ``/proc/<pid>/stat``
tells a reused PID apart from the process the demo saw.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

_PROC = Path("/proc")


@attrs.frozen(slots=True)
class SeenProcess:
    """A process the demo saw: its PID, its start time (clock ticks after boot), its role."""

    pid: int
    start_ticks: int
    role: str


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start ticks) of a live process, None if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def _children_by_parent() -> dict[int, list[int]]:
    by_parent: dict[int, list[int]] = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None:
            by_parent.setdefault(stat[1], []).append(int(entry.name))
    return by_parent


def _kind(pid: int) -> str:
    """What a descendant of an agent is, from its command line."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return "process"
    if b"supervise._demo.train" in raw:
        return "worker"
    if b"os.killpg" in raw:  # the runtime's guard process (python -S -c ...)
        return "guard"
    return "process"


class PidBook:
    """The processes the demo saw (agents, workers, their guards, the reference run)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[int, int], SeenProcess] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, pid: int, role: str) -> None:
        """Remember ``pid`` (if it still runs: a process already gone cannot be left over)."""
        stat = _stat(pid)
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
            stat = _stat(seen.pid)
            if stat is not None and stat[2] == seen.start_ticks and stat[0] not in "ZX":
                alive.append(seen)
        return sorted(alive, key=lambda s: s.pid)

    def roles(self) -> dict[str, int]:
        """How many processes of each kind were seen (for the report)."""
        counts: dict[str, int] = {}
        for seen in self._seen.values():
            kind = seen.role.split(" ", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts
