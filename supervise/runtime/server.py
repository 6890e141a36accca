"""Server (gen_server): a task that owns state and handles calls, casts and info messages in
order, one at a time.

The mailbox is a deque and the server task parks with `wait_task_rescheduled` when it is
empty; a caller appends its `Call`, wakes the server if parked, and parks until the reply
reschedules it. A round trip is exactly two task switches -- no channels, events or cancel
scopes (timeouts go to the per-run `CallTimer`).
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from typing import Any, ClassVar

import outcome
import trio
from outcome import Value
from trio.lowlevel import Abort, RaiseCancelT, Task, current_task, reschedule, wait_task_rescheduled

from supervise.runtime import registry
from supervise.runtime._calls import Call, CallTimer, for_this_run
from supervise.runtime._log import log
from supervise.runtime.errors import NoProc
from supervise.runtime.exit import NORMAL, SHUTDOWN, ExitKind, ExitReason
from supervise.runtime.spec import LaunchContext

_CAST = object()
_INFO = object()
_STOP = object()

# A server with a non-empty mailbox yields to the scheduler after this many messages in a row.
_BURST = 64


class _Mailbox:
    """The live part of one server incarnation, shared by its refs."""

    __slots__ = (
        "alive",
        "current",
        "exited",
        "label",
        "messages",
        "parked",
        "task",
        "timer",
        "unpark_fn",
    )

    def __init__(self, task: Task, label: str) -> None:
        self.task = task
        self.label = label
        self.messages: deque[Any] = deque()
        self.parked = False
        self.alive = True
        self.current: Call | None = None
        self.exited = trio.Event()
        self.timer: CallTimer = for_this_run()
        self.unpark_fn = self.unpark  # bound once, not per park

    def post(self, message: Any) -> None:
        if self.alive:
            self.messages.append(message)
            if self.parked:
                self.parked = False
                reschedule(self.task)

    def unpark(self, _raise_cancel: RaiseCancelT) -> Abort:
        self.parked = False
        return Abort.SUCCEEDED

    def close(self, reason: ExitReason) -> None:
        """No more messages; pending callers get `NoProc`."""
        self.alive = False
        pending = [self.current, *self.messages] if self.current else list(self.messages)
        self.messages.clear()
        self.current = None
        for msg in pending:
            if msg.__class__ is Call and not msg.done:
                err = NoProc(f"{self.label} exited ({reason}) before replying")
                err.__cause__ = reason.exception
                msg.reply(outcome.Error(err))


class ServerRef:
    """A handle on one server incarnation (like an OTP pid). After a restart, `whereis` gives
    the new one; calls through an old ref raise `NoProc`."""

    __slots__ = ("_box",)

    def __init__(self, box: _Mailbox) -> None:
        self._box = box

    @property
    def alive(self) -> bool:
        """Whether this incarnation still accepts messages."""
        return self._box.alive

    async def call(self, request: Any, timeout: float | None = 5.0) -> Any:  # noqa: ASYNC109
        """Send ``request`` to ``handle_call`` and return its reply.

        Raises `CallTimeout` after ``timeout`` seconds (None: wait forever), `NoProc` if the
        server is not running or exits before replying, and whatever ``handle_call`` raised
        (the server crashes with it too).
        """
        box = self._box
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout = {timeout!r}: must be seconds > 0, or None")
        if not box.alive:
            raise NoProc(f"{box.label} is not running")
        task = current_task()
        if task is box.task:
            raise RuntimeError(f"{box.label} called itself: that would deadlock")
        call = Call(task, request, box.label)
        box.messages.append(call)
        if box.parked:
            box.parked = False
            reschedule(box.task)
        if timeout is not None and timeout != math.inf:
            box.timer.add(call, timeout)
        return await wait_task_rescheduled(call)

    def cast(self, message: Any) -> None:
        """Send ``message`` to ``handle_cast``; never raises, dropped if the server is gone."""
        self._box.post((_CAST, message))

    def send(self, message: Any) -> None:
        """Send ``message`` to ``handle_info`` (a plain message); never raises."""
        self._box.post((_INFO, message))

    async def stop(self) -> None:
        """Stop the server normally after the messages already queued (OTP ``gen_server:stop``)
        and wait until it terminated. A supervised permanent server is restarted."""
        box = self._box
        if not box.alive:
            raise NoProc(f"{box.label} is not running")
        if current_task() is box.task:
            raise RuntimeError(f"{box.label} cannot wait for itself to stop: raise Shutdown")
        box.post((_STOP, None))
        await box.exited.wait()

    def __repr__(self) -> str:
        return f"<ServerRef {self._box.label} {'alive' if self._box.alive else 'exited'}>"


class Server:
    """Subclass and override the callbacks. State lives on ``self``; a restart builds a new
    instance. Handlers may be plain functions (fastest) or ``async def``.

    - ``async init(*args, **kwargs)``: set up state; raising means the start failed.
    - ``handle_call(request)``: return the reply; an exception goes to the caller and crashes
      the server.
    - ``handle_cast(message)``, ``handle_info(message)``: no reply.
    - ``terminate(reason)``: clean up, within the child's ``shutdown`` seconds.
    """

    _supervise_kind: ClassVar[str] = "worker"
    _supervise_takes_args: ClassVar[bool] = True
    _supervise_registers: ClassVar[bool] = True
    _async_handlers: ClassVar[tuple[bool, bool, bool, bool, bool]] = (
        True,
        False,
        False,
        False,
        False,
    )

    _ref: ServerRef

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._async_handlers = tuple(  # type: ignore[assignment]
            inspect.iscoroutinefunction(getattr(cls, name))
            for name in ("init", "handle_call", "handle_cast", "handle_info", "terminate")
        )

    @property
    def ref(self) -> ServerRef:
        """This server's own ref (Erlang's ``self()``), e.g. to cast to itself."""
        return self._ref

    async def init(self, *args: Any, **kwargs: Any) -> None:
        """Set up the state from the child's arguments."""
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.init() takes no arguments; override init")

    def handle_call(self, request: Any) -> Any:
        """Reply to ``request``."""
        raise NotImplementedError(f"{type(self).__name__} does not handle calls ({request!r})")

    def handle_cast(self, message: Any) -> Any:
        """Handle a cast."""
        raise NotImplementedError(f"{type(self).__name__} does not handle casts ({message!r})")

    def handle_info(self, message: Any) -> Any:
        """Handle a plain message; by default logged and dropped (as OTP)."""
        log.warning("server_unexpected_info", server=self._ref._box.label, message=repr(message))

    def terminate(self, reason: ExitReason) -> Any:
        """Called once when the server exits (not when ``init`` failed)."""

    # ------------------------------------------------------------------ running

    @classmethod
    async def serve(
        cls,
        *args: Any,
        name: str | None = None,
        shutdown: float = 5.0,
        task_status: trio.TaskStatus[ServerRef] = trio.TASK_STATUS_IGNORED,
        **kwargs: Any,
    ) -> None:
        """Run one incarnation without a supervisor: ``ref = await nursery.start(S.serve, ...)``.

        Returns when the server stops normally or with `Shutdown`; raises what crashed it.
        """
        label = f"server {name!r}" if name else f"{cls.__name__} server"
        reason = await cls._lifecycle(
            args=args,
            kwargs=kwargs,
            name=name,
            shutdown=shutdown,
            started=task_status.started,
            label=label,
        )
        if reason.kind is ExitKind.ABNORMAL and reason.exception is not None:
            raise reason.exception

    @classmethod
    async def _supervise_launch(cls, ctx: LaunchContext) -> ExitReason:
        spec = ctx.spec
        label = f"server {spec.name!r}" if spec.name else f"server {ctx.path!r}"
        return await cls._lifecycle(
            args=spec.args,
            kwargs=spec.kwargs,
            name=spec.name,
            shutdown=spec.shutdown,
            started=ctx.started,
            label=label,
        )

    @classmethod
    async def _lifecycle(
        cls,
        *,
        args: tuple[Any, ...],
        kwargs: Any,
        name: str | None,
        shutdown: float,
        started: Any,
        label: str,
    ) -> ExitReason:
        self = cls()
        box = _Mailbox(current_task(), label)
        ref = self._ref = ServerRef(box)
        if name is not None:
            registry.register(name, ref)  # before init, as OTP: early messages queue up
        try:
            init: Any = self.init  # async by contract; a plain def is accepted too
            if cls._async_handlers[0]:
                await init(*args, **kwargs)
            else:
                init(*args, **kwargs)
        except BaseException as exc:
            box.close(ExitReason.from_exception(exc))
            if name is not None:
                registry.unregister(name, ref)
            box.exited.set()
            raise
        started(ref)
        reason = SHUTDOWN
        try:
            reason = await self._loop(box)
        except trio.Cancelled:
            reason = SHUTDOWN
            raise
        except BaseException as exc:
            reason = ExitReason.from_exception(exc)
            raise
        finally:
            box.close(reason)
            if name is not None:
                registry.unregister(name, ref)
            reason = await self._terminate(reason, shutdown)
            box.exited.set()
        return reason

    async def _terminate(self, reason: ExitReason, shutdown: float) -> ExitReason:
        with trio.CancelScope(shield=True) as scope:
            if not math.isinf(shutdown):
                scope.deadline = trio.current_time() + shutdown
            try:
                if type(self)._async_handlers[4]:
                    await self.terminate(reason)
                else:
                    self.terminate(reason)
            except Exception as exc:
                log.error("server_terminate_failed", server=self._ref._box.label, exc_info=exc)
                if reason.kind is not ExitKind.ABNORMAL:
                    reason = ExitReason.from_exception(exc)
        if scope.cancelled_caught:
            log.warning("server_terminate_overdue", server=self._ref._box.label, shutdown=shutdown)
        return reason

    async def _loop(self, box: _Mailbox) -> ExitReason:
        """Handle messages until a stop or a crash; returns why it ended."""
        _, call_async, cast_async, info_async, _ = type(self)._async_handlers
        handle_call = self.handle_call
        messages = box.messages
        burst = 0
        while True:
            if messages:
                burst += 1
                if burst >= _BURST:  # a long queue: stay fair and cancellable
                    burst = 0
                    await trio.lowlevel.checkpoint()
            else:
                burst = 0
                box.parked = True
                await wait_task_rescheduled(box.unpark_fn)  # a sender appends, then wakes us
                if not messages:
                    continue
            msg = messages.popleft()
            if msg.__class__ is Call:
                if msg.done:  # its caller timed out or was cancelled before we got to it
                    continue
                box.current = msg
                try:
                    result = handle_call(msg.request)
                    if call_async:
                        result = await result
                except Exception as exc:
                    box.current = None
                    msg.reply(outcome.Error(exc))
                    return ExitReason.from_exception(exc)
                box.current = None
                if not msg.done:  # inlined Call.reply: this is the hot path
                    msg.done = True
                    reschedule(msg.task, Value(result))
                continue
            tag, payload = msg
            try:
                if tag is _CAST:
                    result = self.handle_cast(payload)
                    if cast_async:
                        await result
                elif tag is _INFO:
                    result = self.handle_info(payload)
                    if info_async:
                        await result
                else:  # _STOP
                    return NORMAL
            except Exception as exc:
                return ExitReason.from_exception(exc)

    def __repr__(self) -> str:
        box = getattr(self, "_ref", None)
        return f"<{type(self).__name__} {box!r}>"
