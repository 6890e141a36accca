"""Call records and the one timer task per trio run that fails overdue calls.

A cancel scope per call costs more than the whole round trip (trio registers and unregisters
its deadline and cancel status). Instead each call appends its record to a FIFO per distinct
timeout; deadlines within one FIFO are increasing, so the timer task only ever looks at FIFO
heads and sleeps until the earliest one. Completed records are dropped lazily from the heads.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import outcome
import trio
from trio.lowlevel import Abort, RaiseCancelT, Task, reschedule

from supervise.runtime.errors import CallTimeout


class Call:
    """One pending ``call``: the caller parks until ``done`` is set by a reply, a timeout, the
    server's exit, or its own cancellation."""

    __slots__ = ("deadline", "done", "request", "server", "task")

    deadline: float  # set when a timeout is armed

    def __init__(self, task: Task, request: Any, server: str) -> None:
        self.task = task
        self.request = request
        self.server = server  # for messages
        self.done = False

    def __call__(self, _raise_cancel: RaiseCancelT) -> Abort:
        """The caller was cancelled (the call is its own abort_fn: no bound method per call)."""
        self.done = True
        return Abort.SUCCEEDED

    def reply(self, result: outcome.Outcome[Any]) -> None:
        """Wake the caller with ``result`` unless it already gave up."""
        if not self.done:
            self.done = True
            reschedule(self.task, result)


class CallTimer:
    """Fails calls whose deadline passed; one per trio run (`for_this_run`)."""

    def __init__(self) -> None:
        self._fifos: dict[float, deque[Call]] = {}
        self._armed = math.inf  # when the timer task wakes next
        self._scope: trio.CancelScope | None = None

    def add(self, call: Call, timeout: float) -> None:
        """Arm ``call`` to fail with `CallTimeout` after ``timeout`` seconds."""
        fifo = self._fifos.get(timeout)
        if fifo is None:
            fifo = self._fifos[timeout] = deque()
        else:
            while fifo and fifo[0].done:
                fifo.popleft()
        deadline = call.deadline = trio.current_time() + timeout
        fifo.append(call)
        if deadline < self._armed:
            self._armed = deadline
            if self._scope is not None:
                self._scope.deadline = deadline

    async def run(self) -> None:
        """The timer task: sleep until the earliest head, fail what is due, repeat."""
        while True:
            with trio.CancelScope(deadline=self._armed) as self._scope:
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            earliest = math.inf
            for timeout, fifo in list(self._fifos.items()):
                while fifo and (fifo[0].done or fifo[0].deadline <= now):
                    call = fifo.popleft()
                    if not call.done:
                        msg = f"call to {call.server} timed out after {timeout:g} s"
                        call.reply(outcome.Error(CallTimeout(msg)))
                if fifo:
                    earliest = min(earliest, fifo[0].deadline)
                else:
                    del self._fifos[timeout]
            self._armed = earliest


_timer: trio.lowlevel.RunVar[CallTimer] = trio.lowlevel.RunVar("supervise_call_timer")


def for_this_run() -> CallTimer:
    """This trio run's call timer, its system task started on first use."""
    try:
        return _timer.get()
    except LookupError:
        timer = CallTimer()
        _timer.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name="supervise call timer")
        return timer
