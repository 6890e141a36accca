"""The agent's private run directory (ipc sockets, spares' go orders), owned by PID and start
time, so that one left by an agent killed with ``kill -9`` is removed by the next agent start;
and `NodeLock`, which makes one agent at a time the owner of a node's arenas in ``--shm-dir``.

``$TMPDIR/supervise-n<rank>-<random>/`` holds an ``owner`` file: the agent's PID and its start
time (clock ticks after boot, from ``/proc/<pid>/stat``). A PID alone is no identity (the
kernel reuses them), so a directory is stale only when its owner PID is gone or now belongs
to a process started at another time. A directory without a readable owner file is never
removed (it may be one being created right now, or not ours): nothing goes by name alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Final

import structlog

from supervise.agents.preflight import StartupError
from supervise.runtime.private import PRIVATE_DIR, open_private, private_dirs, write_private
from supervise.runtime.procfs import stat_fields

__all__ = [
    "OWNER_FILE",
    "NodeLock",
    "claim_run_dir",
    "dead_nodes_arenas",
    "process_start_ticks",
    "remove_stale_run_dirs",
]

log = structlog.get_logger("supervise.agents.rundir")

OWNER_FILE: Final = "owner"
_PREFIX: Final = "supervise-n"
_RUN_DIR: Final = re.compile(rf"^{_PREFIX}\d+-[A-Za-z0-9_]+$")


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), None if there is no such process."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return None
    if fields[0] in "ZX":  # a zombie runs no code: its owner is gone
        return None
    return int(fields[19])


def _owner(path: Path) -> tuple[int, int] | None:
    """(pid, start ticks) from a run dir's owner file or a lock file, None if unreadable."""
    try:
        pid, ticks = path.read_text().split()
        return int(pid), int(ticks)
    except (OSError, ValueError):
        return None


def _owner_alive(pid: int, ticks: int) -> bool:
    if pid == os.getpid():
        return True
    if ticks < 0:  # no start time where it was written (no /proc): the PID must be gone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return process_start_ticks(pid) == ticks


def remove_stale_run_dirs(base: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove the run dirs in ``base`` (default: the temp dir) whose owner agent is dead, of
    any rank; returns them."""
    root = Path(base if base is not None else tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if not _RUN_DIR.match(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            owner = _owner(Path(entry.path, OWNER_FILE))
            if owner is None or _owner_alive(*owner):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.lexists(entry.path):
                removed.append(Path(entry.path))
    if removed:
        log.info("removed run dirs of dead agents", dirs=[str(p) for p in removed])
    return removed


def claim_run_dir(rank: int, base: str | os.PathLike[str] | None = None) -> Path:
    """A fresh run dir for node ``rank``'s agent, owned by this process (stale ones of dead
    agents are removed first)."""
    remove_stale_run_dirs(base)
    path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{rank}-", dir=base))
    path.chmod(PRIVATE_DIR)  # mkdtemp's 0700, whatever the umask
    tmp = path / f".{OWNER_FILE}.tmp"
    write_private(tmp, _owner_line())
    tmp.replace(path / OWNER_FILE)
    return path


def _owner_line() -> str:
    """``<pid> <start ticks>`` of this process, one line (ticks -1 where there is no /proc)."""
    ticks = process_start_ticks(os.getpid())
    return f"{os.getpid()} {ticks if ticks is not None else -1}\n"


class NodeLock:
    """An exclusive ``flock`` on ``<shm dir>/supervise-<node>.lock`` for the agent's life: only
    one agent at a time adopts and owns a node's arenas (a second one started by mistake would
    take over and then remove a running agent's snapshots). The kernel drops the lock when its
    holder dies, even by ``kill -9``; the next holder reuses the file, a clean stop removes it.
    """

    def __init__(self, shm_dir: str | os.PathLike[str], node: str) -> None:
        self.path = Path(shm_dir) / f"supervise-{node}.lock"
        private_dirs(self.path.parent)
        fd = open_private(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (os.pread(fd, 64, 0).decode(errors="replace").split() or ["?"])[0]
            os.close(fd)
            raise StartupError(
                "--shm-dir",
                f"another agent of {node} (pid {holder}) is running on {str(shm_dir)!r}",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, _owner_line().encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(fd)


def dead_nodes_arenas(shm_dir: str | os.PathLike[str], own: str) -> dict[str, list[Path]]:
    """Arenas in ``shm_dir`` of other nodes whose agent is dead (its lock file's owner PID
    gone or reused): only that node's next agent (same rank, port, dir) would adopt them.
    Read from the lock files, never by taking a lock (that could refuse a starting agent)."""
    out: dict[str, list[Path]] = {}
    root = Path(shm_dir)
    for lock in sorted(root.glob("supervise-*.lock")) if root.is_dir() else ():
        node = lock.name.removeprefix("supervise-").removesuffix(".lock")
        if node == own:
            continue
        owner = _owner(lock)
        if owner is None or _owner_alive(*owner):
            continue
        arenas = sorted(root.glob(f"supervise-{node}-r[0-9]*.arena"))
        if arenas:
            out[node] = arenas
    return out
