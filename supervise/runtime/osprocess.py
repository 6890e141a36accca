"""OS-process children: spawn, forward output line by line, stop with SIGTERM -> SIGKILL.

No orphans: each child leads its own process group, which is signalled as a whole and swept
with SIGKILL once the leader exited (before it is reaped, so the group id cannot be reused
meanwhile). If the supervising process dies hard, the kernel SIGKILLs the leader (Linux,
``PR_SET_PDEATHSIG``) and a guard process kills what is left of its group (`_guard`).

Usable on its own (``nursery.start(OsProcess(...).run)``) and as a supervised child.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import trio

from supervise._validation import InvalidValue
from supervise.runtime._guard import guard
from supervise.runtime._log import log
from supervise.runtime._spawn import Spawned, spawn
from supervise.runtime.exit import ExitReason
from supervise.runtime.spec import LaunchContext

_MAX_LINE = 64 * 1024  # longer lines are forwarded in pieces
_DRAIN_GRACE = 1.0  # seconds to read what is left in the pipes after the process exited
_POLL = 0.05  # exit polling interval where there is no pidfd (not Linux >= 5.3)

Spawner = Callable[["OsProcess"], Awaitable[Spawned]]
"""Starts the process of an `OsProcess` some other way than forking it here (e.g. a fork
server whose children become ours): returns it as `adopt` does; raises `OSError` if it
cannot."""


def guard_pid() -> int | None:
    """The PID of this process's guard (started with its first OS-process child; None before):
    a child of this process too, which a process listing shows next to the others."""
    return guard.pid


@attrs.frozen(slots=True)
class OutputLine:
    """One line a process wrote, as handed to an ``on_output`` sink."""

    pid: int
    stream: str  # "stdout" | "stderr"
    text: str


def _argv(value: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidValue("argv", value, "must be a list of strings, e.g. ['python', 'train.py']")
    argv = tuple(os.fspath(a) if isinstance(a, os.PathLike) else a for a in value)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidValue("argv", value, "must be a non-empty list of strings")
    return argv


def _env(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidValue("env", value, "must map str to str")
    return dict(value)


def _cwd(value: str | os.PathLike[str] | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike):
        raise InvalidValue("cwd", value, "must be a path")
    return os.fspath(value)


def _fds(value: Sequence[int]) -> tuple[int, ...]:
    fds = tuple(value)
    if not all(isinstance(fd, int) and not isinstance(fd, bool) and fd > 2 for fd in fds):
        raise InvalidValue("pass_fds", value, "must be file descriptor numbers > 2")
    return fds


def _sink(_inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not callable(value):
        raise InvalidValue(attr.name, value, "must be a callable taking an OutputLine, or None")


@attrs.frozen(slots=True, eq=False)
class OsProcess:
    """An OS process to run: ``argv``, ``env`` (added to the parent's environment unless
    ``inherit_env=False``), ``cwd``, ``pass_fds`` (descriptors it inherits, under their
    numbers). Its stdout/stderr lines go to the log and ``on_output``.

    A non-zero exit code or death by a signal is an abnormal exit; stopping it sends SIGTERM to
    its process group, waits ``shutdown`` seconds, then SIGKILL.
    """

    _supervise_kind: ClassVar[str] = "worker"
    _supervise_takes_args: ClassVar[bool] = False
    _supervise_registers: ClassVar[bool] = False

    argv: tuple[str, ...] = attrs.field(converter=_argv)
    env: Mapping[str, str] | None = attrs.field(default=None, converter=_env)
    cwd: str | None = attrs.field(default=None, converter=_cwd)
    inherit_env: bool = attrs.field(default=True, kw_only=True)
    on_output: Callable[[OutputLine], None] | None = attrs.field(
        default=None, validator=_sink, kw_only=True
    )
    log_output: bool = attrs.field(default=True, kw_only=True)
    pass_fds: tuple[int, ...] = attrs.field(default=(), converter=_fds, kw_only=True)

    def environment(self) -> dict[str, str] | None:
        """The environment the process gets (None: exactly the parent's)."""
        if self.inherit_env:
            return None if self.env is None else {**os.environ, **self.env}
        return dict(self.env or {})

    async def run(
        self,
        *,
        shutdown: float = 5.0,
        label: str | None = None,
        via: Spawner | None = None,
        task_status: trio.TaskStatus[ProcessHandle] = trio.TASK_STATUS_IGNORED,
    ) -> ExitReason:
        """Spawn the process and return its `ExitReason` once it exited.

        ``task_status.started`` hands out a `ProcessHandle` (pid, wait, stop, signal). If this
        task is cancelled the process is stopped first (SIGTERM, ``shutdown`` s, SIGKILL).
        ``via`` starts it instead of a fork here (the handle works the same). Raises `OSError`
        if it cannot be spawned.
        """
        if isinstance(shutdown, bool) or not isinstance(shutdown, int | float) or not shutdown >= 0:
            raise ValueError(f"shutdown = {shutdown!r}: must be seconds >= 0")
        return await self._run(shutdown, task_status.started, label or self.argv[0], via)

    async def _supervise_launch(self, ctx: LaunchContext) -> ExitReason:
        return await self._run(ctx.spec.shutdown, ctx.started, ctx.path)

    async def _run(
        self,
        shutdown: float,
        started: Callable[[ProcessHandle], None],
        label: str,
        via: Spawner | None = None,
    ) -> ExitReason:
        if via is None:
            spawned = await spawn(list(self.argv), self.environment(), self.cwd, self.pass_fds)
        else:
            spawned = await via(self)
        handle = ProcessHandle(self, spawned, shutdown, label)
        guard.watch(handle.pid)  # its group dies with us, even if we are killed hard
        log.info("process_started", child=label, pid=handle.pid, argv=list(self.argv))
        try:
            async with trio.open_nursery() as nursery:
                for pump in handle._pumps:
                    nursery.start_soon(pump.run)
                started(handle)
                await handle._watch()
                nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_GRACE
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle._shutdown()
            raise
        finally:
            await handle._close()
        assert handle.reason is not None
        return handle.reason


class _Pump:
    """Reads one pipe and forwards complete lines; cancellable without losing a byte."""

    __slots__ = ("_buffer", "_handle", "_stream", "drained", "eof", "name", "running")

    def __init__(self, handle: ProcessHandle, stream: trio.abc.ReceiveStream, name: str) -> None:
        self._handle = handle
        self._stream = stream
        self.name = name
        self._buffer = bytearray()
        self.eof = False
        self.running = False
        self.drained = trio.Event()

    async def run(self) -> None:
        self.running = True
        try:
            await self._forward()
        finally:
            self.running = False

    async def _forward(self) -> None:
        buffer = self._buffer
        while not self.eof:
            try:
                data = await self._stream.receive_some(65536)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                data = b""
            if not data:
                self.eof = True
                if buffer:
                    self._emit(bytes(buffer))
                    buffer.clear()
                self.drained.set()
                return
            buffer += data
            start = 0
            while True:
                end = buffer.find(b"\n", start)
                if end < 0:
                    break
                self._emit(bytes(buffer[start:end]))
                start = end + 1
            del buffer[:start]
            while len(buffer) >= _MAX_LINE:
                self._emit(bytes(buffer[:_MAX_LINE]))
                del buffer[:_MAX_LINE]

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self._handle._output(self.name, text)


class ProcessHandle:
    """A running OS process: its pid, how it exited, and how to stop it."""

    def __init__(self, spec: OsProcess, spawned: Spawned, shutdown: float, label: str) -> None:
        self.spec = spec
        self.pid: int = spawned.popen.pid
        self.label = label
        self.reason: ExitReason | None = None  # set once it exited and was reaped
        self._popen = spawned.popen
        self._streams = (spawned.stdout, spawned.stderr)
        self._shutdown_after = shutdown
        self._stopping = False
        self._exited = trio.Event()
        self._sink_failed = False
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: poll, no group sweep
            self._pidfd = None
        self._pumps = (_Pump(self, spawned.stdout, "stdout"), _Pump(self, spawned.stderr, "stderr"))

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal)."""
        return self._popen.returncode if self.reason is not None else None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process group (a no-op once the process was reaped: its id
        may belong to another process by then)."""
        if self._popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    async def wait(self) -> ExitReason:
        """Wait for the process to exit; its reason."""
        await self._exited.wait()
        assert self.reason is not None
        return self.reason

    async def stop(self, timeout: float | None = None) -> ExitReason:  # noqa: ASYNC109
        """SIGTERM the process group, wait ``timeout`` seconds (default: the child's
        ``shutdown``), then SIGKILL; returns the exit reason (kind *shutdown*, unless the
        process had exited on its own already)."""
        if self._popen.returncode is not None:  # it exited on its own (its output may still drain)
            return await self.wait()
        grace = self._shutdown_after if timeout is None else timeout
        self._stopping = True
        if grace > 0:
            log.info(
                "process_stopping", child=self.label, pid=self.pid, signal="SIGTERM", timeout=grace
            )
            self.signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self._exited.wait()
        if not self._exited.is_set():
            if grace > 0:
                log.warning("process_kill", child=self.label, pid=self.pid, after=grace)
            self.signal(signal.SIGKILL)
        return await self.wait()

    # ----------------------------------------------------------------- internals

    async def _watch(self) -> None:
        """Wait for the leader to exit, sweep its group, reap it, record the reason."""
        if self._exited.is_set():
            return
        if self._popen.returncode is None:  # else a watch cancelled while draining reaped it
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
                # The leader is a zombie: its pid (= the group id) cannot be reused yet.
                self.signal(signal.SIGKILL)
                self._popen.wait()  # a zombie: reaped at once
            else:
                while self._popen.poll() is None:  # noqa: ASYNC110 (nothing to wait on)
                    await trio.sleep(_POLL)
            guard.forget(self.pid)
        returncode = self._popen.returncode
        assert returncode is not None  # reaped above
        # Its last lines come before its exit: the group is dead, so the pipes close at once
        # (unless something escaped the group and holds them: then only up to the grace).
        with trio.move_on_after(_DRAIN_GRACE):
            for pump in self._pumps:
                if pump.running:
                    await pump.drained.wait()
        self.reason = ExitReason.from_returncode(returncode, stopped=self._stopping)
        log_exit = log.error if self.reason.abnormal else log.info
        log_exit(
            "process_exited",
            child=self.label,
            pid=self.pid,
            reason=self.reason.kind.value,
            exit_code=self.reason.exit_code,
            signal=self.reason.signal,
        )
        self._exited.set()

    async def _shutdown(self) -> None:
        """Our task was cancelled: stop the process, keep forwarding its last words."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            for pump in self._pumps:
                if not pump.eof:
                    nursery.start_soon(pump.run)
            await self.stop()
            nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_GRACE

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            if self.reason is None:  # e.g. a KeyboardInterrupt: never leave it behind
                self._stopping = True
                self.signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await self._watch()
            for stream in self._streams:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            if self._pidfd is not None:
                fd, self._pidfd = self._pidfd, None
                trio.lowlevel.notify_closing(fd)
                os.close(fd)

    def _output(self, stream: str, text: str) -> None:
        spec = self.spec
        if spec.log_output:
            log.info("process_output", child=self.label, pid=self.pid, stream=stream, line=text)
        sink = spec.on_output
        if sink is not None:
            try:
                sink(OutputLine(self.pid, stream, text))
            except Exception as exc:
                if not self._sink_failed:  # once, not per line
                    self._sink_failed = True
                    log.error(
                        "process_output_sink_failed", child=self.label, pid=self.pid, exc_info=exc
                    )

    def __repr__(self) -> str:
        state = "running" if self.reason is None else str(self.reason)
        return f"<ProcessHandle {self.label} pid={self.pid} {state}>"
