"""Spawning OS children from one long-lived thread.

``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the process.
`trio.lowlevel.open_process` forks from trio's worker-thread cache, whose threads retire after
10 idle seconds -- which would SIGKILL every child ten seconds in. So all OS children are forked
by one daemon thread that lives as long as this process; the trio side waits for it without
blocking the event loop (a fork can take milliseconds in a process with large mappings).
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
from collections.abc import Callable
from typing import Any, Protocol

import outcome
import trio

from supervise.runtime import _pdeathsig


class _SpawnerThread:
    """One daemon thread running spawn jobs in order (a new one after a fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], None]] | None = None
        self._owner = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._jobs is None or self._owner != os.getpid():
                self._jobs = queue.SimpleQueue()
                self._owner = os.getpid()
                thread = threading.Thread(
                    target=self._serve, args=(self._jobs,), name="supervise-spawner", daemon=True
                )
                thread.start()
            self._jobs.put(job)

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            jobs.get()()


_thread = _SpawnerThread()


_STATUS_LOST = 255  # an adopted child reaped elsewhere: an abnormal exit of unknown cause


class Child(Protocol):
    """What a `ProcessHandle` needs of a child: `subprocess.Popen`'s pid, returncode, poll
    and wait (`Adopted` for a child that another process forked and that became ours)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...


class Adopted:
    """A child of this process that it did not fork itself (re-parented to it as a child
    subreaper): reaped with ``waitpid``, its status decoded as `subprocess.Popen` does."""

    __slots__ = ("pid", "returncode")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def _reaped(self, flags: int) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # not (or no longer) ours to reap: its status is lost
                self.returncode = _STATUS_LOST
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reaped(os.WNOHANG)

    def wait(self) -> int:
        code = self._reaped(0)
        assert code is not None
        return code


class Spawned:
    """A freshly forked child: its `subprocess.Popen` and the trio ends of its output pipes."""

    __slots__ = ("popen", "stderr", "stdout")

    def __init__(
        self,
        popen: Child,
        stdout: trio.lowlevel.FdStream,
        stderr: trio.lowlevel.FdStream,
    ) -> None:
        self.popen = popen
        self.stdout = stdout
        self.stderr = stderr


def adopt(pid: int, stdout: int, stderr: int) -> Spawned:
    """A `Spawned` for ``pid``, a child of this process forked elsewhere, whose output comes
    through the read ends ``stdout`` and ``stderr`` (taken over: closed with the handle)."""
    return Spawned(Adopted(pid), trio.lowlevel.FdStream(stdout), trio.lowlevel.FdStream(stderr))


async def spawn(
    argv: list[str], env: dict[str, str] | None, cwd: str | None, pass_fds: tuple[int, ...] = ()
) -> Spawned:
    """Fork ``argv`` in its own session, stdout/stderr piped, SIGKILLed if we die (Linux);
    ``pass_fds`` stay open in the child (under their numbers).

    Not cancellable while the fork is under way (a cancelled spawn must not leak a process):
    the caller gets the child, then the cancellation at its next checkpoint.
    """
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    preexec = _pdeathsig.preexec_for(os.getpid())

    def fork() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_write,
            stderr=err_write,
            env=env,
            cwd=cwd,
            pass_fds=pass_fds,
            start_new_session=True,  # its own process group: signalled and swept as a whole
            # Thread-safe here: it only calls a pre-bound prctl and getppid, no locks, no imports.
            preexec_fn=preexec,  # noqa: PLW1509
        )

    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    result: list[outcome.Outcome[subprocess.Popen[bytes]]] = []

    def job() -> None:
        forked = outcome.capture(fork)

        def deliver() -> None:
            result.append(forked)
            done.set()

        token.run_sync_soon(deliver)

    try:
        _thread.submit(job)
        with trio.CancelScope(shield=True):
            await done.wait()
        popen: Any = result[0].unwrap()
    except BaseException:
        os.close(out_read)
        os.close(err_read)
        raise
    finally:
        os.close(out_write)  # the child holds its own copies
        os.close(err_write)
    return Spawned(popen, trio.lowlevel.FdStream(out_read), trio.lowlevel.FdStream(err_read))
