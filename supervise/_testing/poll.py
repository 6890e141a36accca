"""Waiting on a condition with a deadline: the one polling helper of the tests, the demo and the
benchmarks, for state another process changes (a log file, a PID, a collector's spans) where
no event exists to wait on.

``wait_until`` blocks the calling thread; ``wait_until_async`` is the same from a trio task (and
can be woken early by an event). Both return the condition's first truthy value; on the
deadline they raise ``WaitTimeout``, whose message says what was awaited, for how long, and
(``details``) what the state was then. An exception raised by the condition ends the wait.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import trio

T = TypeVar("T")

DEFAULT_INTERVAL_S = 0.05


class WaitTimeout(TimeoutError):
    """A condition did not hold by its deadline; ``what`` names it."""

    def __init__(self, what: str, timeout_s: float, details: str = "") -> None:
        self.what = what
        self.timeout_s = timeout_s
        self.details = details
        message = f"timed out after {timeout_s:g} s waiting for {what}"
        super().__init__(f"{message}\n{details}" if details else message)


def _details(details: Callable[[], str] | None) -> str:
    if details is None:
        return ""
    try:
        return details()
    except Exception as exc:  # the state could not be described: say so, keep the timeout
        return f"(describing the state failed: {exc!r})"


def wait_until(
    condition: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float,
    interval_s: float = DEFAULT_INTERVAL_S,
    details: Callable[[], str] | None = None,
) -> T:
    """Call ``condition`` every ``interval_s`` until it returns something truthy, and return
    that; ``WaitTimeout`` (``what``, plus ``details()``) if it does not within ``timeout_s``.
    The condition is checked once more at the deadline, so a slow check cannot lose a wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, timeout_s, _details(details))
        time.sleep(min(interval_s, left))


@overload
async def wait_until_async(
    condition: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout_s: float,
    interval_s: float = ...,
    details: Callable[[], str] | None = ...,
    wake: Callable[[], trio.Event] | None = ...,
) -> T: ...


@overload
async def wait_until_async(
    condition: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float,
    interval_s: float = ...,
    details: Callable[[], str] | None = ...,
    wake: Callable[[], trio.Event] | None = ...,
) -> T: ...


async def wait_until_async(
    condition: Callable[[], object],
    *,
    what: str,
    timeout_s: float,
    interval_s: float = DEFAULT_INTERVAL_S,
    details: Callable[[], str] | None = None,
    wake: Callable[[], trio.Event] | None = None,
) -> Any:
    """``wait_until`` from a trio task: checks again after ``interval_s``, or as soon as the
    event ``wake()`` returns (a fresh one each round) is set, whichever comes first. The
    condition may be async (a request to another process); the deadline bounds it too."""
    deadline = trio.current_time() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            pending, value = value, None
            with trio.move_on_at(deadline):
                value = await pending
        if value:
            return value
        left = deadline - trio.current_time()
        if left <= 0:
            raise WaitTimeout(what, timeout_s, _details(details))
        with trio.move_on_after(min(interval_s, left)):
            if wake is None:
                await trio.sleep_forever()
            else:
                await wake().wait()
