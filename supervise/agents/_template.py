"""The node's fork server: a template process that imported ``recovery.preload`` once, at
normal priority while the node starts, and forks each spare worker in milliseconds.

A spare forked from it costs the training no CPU to speak of (a fork of a process whose pages
it shares) however busy the cores are, where a spawned spare imports torch in the idle
scheduling class and may never finish on a loaded machine. The template runs
``supervise/_warm.py --template`` (see there for the protocol); each spare it forks becomes
this agent's own child (a child subreaper while it asks), so the spare's `ProcessHandle`
reaps it, reads its exit code and kills its process group exactly as for a spawned one.

`ForkServer.serve` is a supervised child (the spare pool's tree restarts a template that
died); while it is down, `ForkServer.fork` raises `OSError` and the pool spawns spares.
"""

from __future__ import annotations

import array
import contextlib
import functools
import json
import os
import signal
import socket
from pathlib import Path

import structlog
import trio

from supervise.runtime import (
    OsProcess,
    ProcessHandle,
    Spawned,
    adopt,
    child_subreaper,
    set_child_subreaper,
)
from supervise.runtime.procfs import stat_fields

log = structlog.get_logger("supervise.agents.workers")

FORK_TIMEOUT = 10.0  # seconds a fork order may take before the template counts as stuck
_MAX_REPLY = 4096


class TemplateExited(Exception):
    """The template process exited (its supervisor starts another)."""


def _parent_of(pid: int) -> int:
    try:
        return int(stat_fields(pid)[1])
    except (OSError, IndexError, ValueError):
        return 0


class ForkServer:
    """One node's template process and the orders to it (one at a time)."""

    def __init__(self, spec: OsProcess, sock_fd_arg: int, *, shutdown: float = 5.0) -> None:
        self._spec = spec  # argv holds the placeholder SOCKET_FD at index sock_fd_arg
        self._fd_arg = sock_fd_arg
        self._shutdown = shutdown
        self._sock: trio.socket.SocketType | None = None
        self._handle: ProcessHandle | None = None
        self._lock = trio.Lock()
        self._settled = trio.Event()  # this start is ready or gone
        self.forks = 0

    @property
    def up(self) -> bool:
        """Whether a template is ready to fork."""
        return self._sock is not None

    @property
    def pid(self) -> int | None:
        handle = self._handle
        return handle.pid if handle is not None and handle.reason is None else None

    async def settled(self) -> None:
        """Return once the template that is starting is ready (or failed)."""
        await self._settled.wait()

    async def serve(self, *, task_status: trio.TaskStatus[ProcessHandle]) -> None:
        """Run one template process until it exits (then raise: the supervisor restarts it)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = list(self._spec.argv)
        argv[self._fd_arg] = str(theirs.fileno())
        spec = OsProcess(
            argv,
            env=self._spec.env,
            cwd=self._spec.cwd,
            on_output=self._spec.on_output,
            pass_fds=(theirs.fileno(),),
        )
        sock = trio.socket.from_stdlib_socket(ours)
        if self._settled.is_set():  # a restart: the first start's waiters are long gone
            self._settled = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                try:
                    handle: ProcessHandle = await nursery.start(
                        functools.partial(spec.run, shutdown=self._shutdown, label="spare template")
                    )
                finally:
                    theirs.close()
                self._handle = handle
                task_status.started(handle)
                hello = json.loads(await sock.recv(_MAX_REPLY) or b"{}")
                threads = hello.get("threads", 1)
                if threads > 1:  # a fork would copy locks that those threads may hold
                    log.warning(
                        "spare template not used: a preload module started threads; "
                        "spares are spawned",
                        pid=handle.pid,
                        threads=threads,
                    )
                    self._settled.set()
                    await handle.stop()
                    await trio.sleep_forever()  # do not restart it: it would do the same
                if "ready" in hello:
                    log.info("spare template ready", pid=handle.pid, seconds=hello["ready"])
                    self._sock = sock
                self._settled.set()
                reason = await handle.wait()
        finally:
            self._sock = None
            self._settled.set()
            sock.close()
        raise TemplateExited(f"spare template (pid {handle.pid}) exited: {reason}")

    async def fork(self, go_file: Path, _spec: OsProcess) -> Spawned:
        """Have the template fork a spare waiting for ``go_file`` (a `Spawner`)."""
        async with self._lock:
            sock, handle = self._sock, self._handle
            if sock is None or handle is None:
                raise OSError("no spare template is running")
            out_read, out_write = os.pipe()
            err_read, err_write = os.pipe()
            try:
                with trio.CancelScope(shield=True):  # an order in flight must get its reply
                    pid = await self._order(sock, handle, go_file, (out_write, err_write))
            except BaseException:
                os.close(out_read)
                os.close(err_read)
                raise
            finally:
                os.close(out_write)
                os.close(err_write)
            self.forks += 1
            return adopt(pid, out_read, err_read)

    async def _order(
        self,
        sock: trio.socket.SocketType,
        handle: ProcessHandle,
        go_file: Path,
        fds: tuple[int, int],
    ) -> int:
        was = child_subreaper()
        if not set_child_subreaper(True):
            raise OSError("this OS cannot adopt a forked spare (no PR_SET_CHILD_SUBREAPER)")
        reply = b""
        try:
            with trio.move_on_after(FORK_TIMEOUT):
                await sock.sendmsg(
                    [json.dumps({"go": str(go_file)}).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                )
                reply = await sock.recv(_MAX_REPLY)
        except OSError as exc:
            reply = json.dumps({"error": str(exc)}).encode()
        finally:
            set_child_subreaper(bool(was))  # orphans of other children go where they went
        answer = json.loads(reply) if reply else {"error": "no reply"}
        pid = answer.get("pid")
        if not isinstance(pid, int):
            self._sock = None  # stuck, gone or refusing: a fresh one is started
            handle.signal(signal.SIGKILL)
            raise OSError(f"the spare template could not fork: {answer.get('error')}")
        if _parent_of(pid) != os.getpid():  # not ours: we could neither reap nor trust it
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            raise OSError(f"the forked spare {pid} did not become this agent's child")
        return pid
