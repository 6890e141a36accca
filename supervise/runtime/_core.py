"""The supervisor engine behind `Supervisor` and `DynamicSupervisor`.

Task layout of one running supervisor::

    run()                           the caller's task
    ├── watcher                     turns an outside cancellation into an orderly shutdown
    └── [shielded] kids nursery
        ├── control loop            (in run's task) group restarts + management commands
        └── one runner per child    runs the child; one_for_one restarts happen *inline*

Children live in a shielded nursery so that an outside cancellation cannot hit them all at
once: the watcher notices it and the supervisor stops them itself, in reverse start order, each
within its ``shutdown`` (OTP semantics).

Hot path: a one_for_one restart never leaves the child's runner task. The runner catches the
exit, decides synchronously (`_on_exit`: restart type, intensity, backoff) and calls the target
again after one checkpoint -- no message to the supervisor, no new task.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

from supervise.runtime._child import RESTARTING, RUNNING, STOPPED, Child, Waiter
from supervise.runtime._intensity import Intensity
from supervise.runtime._log import log
from supervise.runtime.backoff import Backoff
from supervise.runtime.errors import GaveUp, NoProc, NotFound, StartFailed
from supervise.runtime.exit import NORMAL, SHUTDOWN, ExitKind, ExitReason
from supervise.runtime.spec import AutoShutdown, ChildSpec, Restart, Strategy

T = TypeVar("T")

# The path of the child being run in this task, read by a nested supervisor for its own path.
_child_path: contextvars.ContextVar[str] = contextvars.ContextVar(
    "supervise_child_path", default=""
)

# A stop waits this much longer than the child's `shutdown` before warning that it is overdue
# (an OsProcess needs a moment after SIGKILL to be reaped).
_OVERDUE_GRACE = 1.0


class _GroupRestart:
    """A one_for_all / rest_for_one restart asked for by ``child``'s exit."""

    __slots__ = ("child", "generation", "reason")

    def __init__(self, child: Child, reason: ExitReason) -> None:
        self.child = child
        self.reason = reason
        self.generation = child.generation


class _Command:
    """A management request, run by the control loop so that operations never interleave."""

    __slots__ = ("_done", "fn", "result")

    def __init__(self, fn: Callable[[], Awaitable[Any]]) -> None:
        self.fn = fn
        self.result: outcome.Outcome[Any] | None = None
        self._done = trio.Event()

    def finish(self, result: outcome.Outcome[Any]) -> None:
        if self.result is None:
            self.result = result
            self._done.set()

    async def wait(self) -> Any:
        await self._done.wait()
        assert self.result is not None
        return self.result.unwrap()


class Core:
    """One running supervisor: its children, restart bookkeeping and control loop."""

    def __init__(
        self,
        *,
        children: tuple[ChildSpec, ...],
        strategy: Strategy,
        max_restarts: int,
        max_seconds: float,
        backoff: Backoff | None,
        auto_shutdown: AutoShutdown,
        dynamic: bool,
        max_children: int | None,
    ) -> None:
        self.path = _child_path.get() or "root"  # e.g. "root/workers": ids from the top
        self.strategy = strategy
        self.intensity = Intensity(max_restarts, max_seconds)
        self.backoff = backoff
        self.auto_shutdown = auto_shutdown
        self.dynamic = dynamic
        self.max_children = max_children
        self.children: list[Child] = []
        self.by_id: dict[str, Child] = {}
        for spec in children:
            self.add(spec)
        self.inbox_send, self.inbox = trio.open_memory_channel[_GroupRestart | _Command](math.inf)
        self.control = trio.CancelScope()
        self.kids: trio.Nursery | None = None
        self.closing = False  # no more restarts: an orderly shutdown is under way
        self.closed = trio.Event()
        self.finished = False
        self.cancelled_outside = False
        self.failure: BaseException | None = None  # GaveUp or StartFailed, raised by run()
        self.exit = NORMAL  # SHUTDOWN after an auto_shutdown

    # ----------------------------------------------------------------- lifecycle

    async def run(self, started: Callable[[], None]) -> ExitReason:
        """Start the children, serve until stopped, stop them; raise `GaveUp`/`StartFailed`."""
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._watch_outside_cancel)
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as kids:
                        self.kids = kids
                        with self.control:
                            if await self._start_initial():
                                started()
                                await self._control_loop()
                        await self._stop_all()
                self.finished = True
                outer.cancel_scope.cancel()
        finally:
            self.closing = self.finished = True
            self._close_inbox()
            self.closed.set()
        outcome_ = (
            "cancelled"
            if self.cancelled_outside
            else (type(self.failure).__name__ if self.failure is not None else self.exit.kind.value)
        )
        log.info("supervisor_stopped", supervisor=self.path, reason=outcome_)
        if self.cancelled_outside:
            await trio.lowlevel.checkpoint()  # re-raises the outside cancellation, unwrapped
        if self.failure is not None:
            raise self.failure
        return self.exit

    async def _watch_outside_cancel(self) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            if not self.finished:
                self.cancelled_outside = True
                self.begin_close()
            # Swallowed on purpose: run() re-raises it after the orderly shutdown, unwrapped.

    def begin_close(self) -> None:
        """Stop restarting and let the control loop fall through to the orderly shutdown."""
        self.closing = True
        self.control.cancel()

    def _close_inbox(self) -> None:
        self.inbox_send.close()
        while True:
            try:
                msg = self.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(msg, _Command):
                msg.finish(outcome.Error(NoProc(f"supervisor {self.path} is not running")))

    async def _start_initial(self) -> bool:
        for child in list(self.children):
            failure = await self.activate(child)
            if failure is not None:
                self.failure = StartFailed(child.id, failure)
                log.error(
                    "supervisor_start_failed",
                    supervisor=self.path,
                    child=child.id,
                    reason=str(failure),
                )
                self.begin_close()
                return False
        return True

    async def _control_loop(self) -> None:
        async for msg in self.inbox:
            if isinstance(msg, _GroupRestart):
                await self._group_restart(msg)
            else:
                try:
                    result: outcome.Outcome[Any] = outcome.Value(await msg.fn())
                except trio.Cancelled:
                    msg.finish(outcome.Error(NoProc(f"supervisor {self.path} stopped")))
                    raise
                except Exception as exc:  # delivered to the caller
                    result = outcome.Error(exc)
                msg.finish(result)

    async def _stop_all(self) -> None:
        self.closing = True
        if self.dynamic:  # OTP: dynamic children stop concurrently, in no defined order
            async with trio.open_nursery() as nursery:
                for child in list(self.children):
                    nursery.start_soon(self.stop_child, child)
        else:
            for child in reversed(list(self.children)):
                await self.stop_child(child)

    # ----------------------------------------------------------------- children

    async def activate(self, child: Child) -> ExitReason | None:
        """Spawn a runner for ``child``; None once it started, else why it could not start."""
        child.scope = trio.CancelScope()
        child.done = trio.Event()
        child.stopping = False
        child.active = True
        child.state = RESTARTING if child.is_restart else STOPPED
        waiter = child.waiter = Waiter()
        assert self.kids is not None
        self.kids.start_soon(self._runner, child, name=f"supervise child {child.path}")
        return await waiter.wait()

    async def _runner(self, child: Child) -> None:
        _child_path.set(child.path)
        reason = SHUTDOWN
        try:
            with child.scope:
                while True:
                    child.generation += 1
                    child.up = False
                    try:
                        fn = child.fn
                        if fn is None:
                            assert child.launch is not None
                            reason = await child.launch._supervise_launch(child)
                        else:
                            if child.takes_status:
                                await fn(*child.args, task_status=child, **child.kwargs)
                            else:
                                child.started(None)
                                await fn(*child.args, **child.kwargs)
                            reason = NORMAL
                    except Exception as exc:
                        reason = ExitReason.from_exception(exc)
                    except BaseException as exc:
                        # Only our own cancellation (child.scope) may end a child this way.
                        if not child.stopping or isinstance(exc, KeyboardInterrupt | SystemExit):
                            raise
                        reason = SHUTDOWN
                    self._log_exit(child, reason)
                    if child.stopping or (not child.up and child.waiter is not None):
                        break  # stopped by us, or a failed start its starter decides about
                    delay = self._on_exit(child, reason)
                    if delay is None:
                        break
                    # A restart is a checkpoint: cancellable, and fair to other tasks.
                    if delay > 0:
                        await trio.sleep(delay)
                    else:
                        await trio.lowlevel.checkpoint()
        finally:
            child.active = False
            if child.stopping or child.state is RUNNING:
                child.state = STOPPED
            child.ref = None
            waiter = child.waiter
            if waiter is not None:  # ended before it reported started: a failed start
                child.waiter = None
                waiter.resolve(reason)
            child.done.set()

    def _log_exit(self, child: Child, reason: ExitReason) -> None:
        if not child.up and not child.stopping:  # it never reported started
            log.error(
                "child_start_failed",
                supervisor=self.path,
                child=child.id,
                reason=str(reason),
                exc_info=reason.exception,
            )
        elif reason.kind is ExitKind.ABNORMAL:
            exc = reason.exception
            log.error(
                "child_exited",
                supervisor=self.path,
                child=child.id,
                reason="abnormal",
                exit_code=reason.exit_code,
                signal=reason.signal,
                error=None if exc is None else repr(exc),
                exc_info=exc,
            )
        else:
            log.info("child_exited", supervisor=self.path, child=child.id, reason=reason.kind.value)

    def _on_exit(self, child: Child, reason: ExitReason) -> float | None:
        """Decide about a child that exited on its own. Returns the delay before restarting it
        inline (one_for_one), or None when its runner should end."""
        if self.closing:
            child.state = STOPPED
            return None
        restart = child.restart
        if restart is Restart.PERMANENT or (
            restart is Restart.TRANSIENT and reason.kind is ExitKind.ABNORMAL
        ):
            if self.strategy is not Strategy.ONE_FOR_ONE:
                # Counted when the control loop takes it up: siblings that die before then are
                # part of this failure, and their own requests turn out stale (as in OTP).
                child.state = RESTARTING
                child.is_restart = True
                self.inbox_send.send_nowait(_GroupRestart(child, reason))
                return None
            now = trio.current_time()
            if not self.intensity.add(now):
                child.state = STOPPED
                self._give_up(child, reason)
                return None
            child.state = RESTARTING
            child.is_restart = True
            child.restarts += 1
            delay = child.backoff_delay(self.backoff, now)
            if delay > 0:
                log.info(
                    "child_restart_scheduled", supervisor=self.path, child=child.id, delay=delay
                )
            return delay
        child.state = STOPPED
        if restart is Restart.TEMPORARY or self.dynamic:
            self.remove(child)
        if child.spec.significant:
            self._significant_exited(child)
        return None

    def _give_up(self, child: Child, reason: ExitReason) -> None:
        limit = self.intensity.limit
        self.failure = GaveUp(self.path, child.id, reason, limit)
        log.error(
            "supervisor_gave_up",
            supervisor=self.path,
            child=child.id,
            reason=str(reason),
            limit=limit,
        )
        self.begin_close()

    def _significant_exited(self, child: Child) -> None:
        mode = self.auto_shutdown
        if mode is AutoShutdown.NEVER:
            return
        if mode is AutoShutdown.ALL_SIGNIFICANT and any(
            c.spec.significant and c.state is not STOPPED for c in self.children if c is not child
        ):
            return
        log.info("supervisor_auto_shutdown", supervisor=self.path, child=child.id, mode=mode.value)
        self.exit = SHUTDOWN
        self.begin_close()

    def remove(self, child: Child) -> None:
        if self.by_id.get(child.id) is child:
            del self.by_id[child.id]
            self.children.remove(child)

    async def stop_child(self, child: Child) -> None:
        """Stop one child (idempotent): cancel its runner, wait for it within ``shutdown``."""
        if child.active:
            child.stopping = True
            child.scope.cancel()
            shutdown = child.spec.shutdown
            if math.isinf(shutdown):
                await child.done.wait()
            else:
                with trio.move_on_after(shutdown + _OVERDUE_GRACE):
                    await child.done.wait()
                if not child.done.is_set():
                    log.warning(
                        "child_shutdown_overdue",
                        supervisor=self.path,
                        child=child.id,
                        shutdown=shutdown,
                    )
                    await child.done.wait()
        child.state = STOPPED
        child.ref = None
        if child.restart is Restart.TEMPORARY or self.dynamic:
            self.remove(child)

    async def _group_restart(self, msg: _GroupRestart) -> None:
        """one_for_all / rest_for_one: stop the affected siblings in reverse order, start all
        affected children in order; a failed start counts as a restart and is retried."""
        trigger, reason = msg.child, msg.reason
        if (
            trigger.generation != msg.generation
            or trigger.state is not RESTARTING
            or trigger not in self.children
        ):
            return  # stale: restarted with another's group meanwhile, or terminated
        while True:
            now = trio.current_time()
            if not self.intensity.add(now):
                trigger.state = STOPPED
                self._give_up(trigger, reason)
                return
            failed = await self._restart_group(trigger, trigger.backoff_delay(self.backoff, now))
            if failed is None:
                return
            trigger, reason = failed
            trigger.state = RESTARTING

    async def _restart_group(self, trigger: Child, delay: float) -> tuple[Child, ExitReason] | None:
        """One attempt of a group restart; the child that failed to start, and why, or None."""
        index = self.children.index(trigger)
        group = self.children[index:] if self.strategy is Strategy.REST_FOR_ONE else self.children
        group = list(group)
        for c in group:
            if c.active:
                c.stopping = True  # their exits from now on are expected, not failures
        for c in reversed(group):
            await self.stop_child(c)
        group = [c for c in group if c in self.children]  # temporary children are gone
        for c in group:
            c.state = RESTARTING
        if delay > 0:
            log.info("child_restart_scheduled", supervisor=self.path, child=trigger.id, delay=delay)
            await trio.sleep(delay)
        for c in group:
            c.restarts += 1
            c.is_restart = True
            failure = await self.activate(c)
            if failure is not None:
                return c, failure
        return None

    # ----------------------------------------------------------------- management

    async def request(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` in the control loop (so operations never interleave with restarts or
        each other); its result or exception comes back here."""
        self.check_alive()
        cmd = _Command(fn)
        self.inbox_send.send_nowait(cmd)
        result: T = await cmd.wait()
        return result

    def check_alive(self) -> None:
        """`NoProc` once the supervisor is shutting down or stopped."""
        if self.closing:
            raise NoProc(f"supervisor {self.path} is not running")

    def find(self, child_id: str) -> Child:
        """The child with that id; `NotFound` if there is none."""
        child = self.by_id.get(child_id)
        if child is None:
            raise NotFound(child_id)
        return child

    def add(self, spec: ChildSpec) -> Child:
        """A new last child (not started)."""
        child = Child(spec, self)
        self.children.append(child)
        self.by_id[spec.id] = child
        return child

    async def stop(self) -> None:
        """Orderly shutdown; returns once every child stopped (a child calling this is itself
        stopped meanwhile, so its wait ends in `trio.Cancelled`)."""
        if not self.closing:
            log.info("supervisor_stopping", supervisor=self.path)
            self.begin_close()
        await self.closed.wait()
