"""A guard process that SIGKILLs our OS children's process groups if this process dies hard.

``PR_SET_PDEATHSIG`` kills only the direct child; what *it* spawned (data-loader workers, a
launcher's ranks) lives on in its process group. The guard is a tiny Python process, started
once per supervising process, that holds the read end of a pipe: we write ``+pgid`` when a
child starts and ``-pgid`` once its group is swept. When we die -- even by ``kill -9`` -- the
kernel closes our end, the guard reads EOF, kills every group still registered, and exits.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

from supervise.runtime._log import log

_GUARD = r"""
import os, signal
groups, pending = set(), b""
while True:
    data = os.read(0, 4096)
    if not data:
        break
    *lines, pending = (pending + data).split(b"\n")
    for line in lines:
        if line.startswith(b"+"):
            groups.add(int(line[1:]))
        elif line.startswith(b"-"):
            groups.discard(int(line[1:]))
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""


class _Guard:
    """The guard of this process (started on first use; again after a fork)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._owner = 0  # the pid that started the guard: a forked child needs its own
        self._proc: subprocess.Popen[bytes] | None = None  # kept: no "still running" warning
        self._broken = False

    @property
    def pid(self) -> int | None:
        """The guard process's PID (None: none started by this process yet)."""
        proc = self._proc
        return proc.pid if proc is not None and self._owner == os.getpid() else None

    def watch(self, pgid: int) -> None:
        """Register a process group to kill if we die."""
        self._send(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        """The group is gone (swept and reaped)."""
        self._send(b"-%d\n" % pgid)

    def _start(self) -> int:
        if not sys.executable:  # embedded interpreters: nothing to run the guard with
            raise OSError("no Python executable to run the process guard")
        read_end, write_end = os.pipe()  # not inheritable: only the guard holds a read end
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _GUARD],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # outside our group: it must outlive us
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._fd, self._owner = write_end, os.getpid()
        atexit.register(self.close)
        return write_end

    def close(self) -> None:
        """Release the guard now (at interpreter exit): it sweeps the groups still registered,
        exits, and is reaped here, so it is gone by the time this process is."""
        fd, proc = self._fd, self._proc
        if fd is None or self._owner != os.getpid():
            return
        self._fd, self._proc = None, None
        os.close(fd)
        if proc is not None:
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                log.warning("process_guard_slow_to_exit", pid=proc.pid)

    def _send(self, message: bytes) -> None:
        if self._broken:
            return
        try:
            fd = self._fd if self._fd is not None and self._owner == os.getpid() else self._start()
            os.write(fd, message)
        except OSError as exc:  # no guard: PR_SET_PDEATHSIG still covers the direct children
            self._broken = True
            log.warning("process_guard_unavailable", error=repr(exc))


guard = _Guard()
