"""`TaskContext`: what a task function gets — steps committed once, state, progress, identity.

A step's result is encoded and committed to the journal (when the checkpoint strategy says so;
after every step by default) before the step counts as done; a resumed attempt finds it in the
journal and gets it back instead of running the step again.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from typing import Any

import trio

from supervise._validation import InvalidValue
from supervise.tasks.journal import Commit, Journal, Outcome, StepRecord
from supervise.tasks.policy import Cadence, Checkpoint, EveryStep
from supervise.tasks.telemetry import step_span
from supervise.tasks.values import decode, encode, key_path


class StepError(ValueError):
    """A step used wrongly: an empty name, or a name already run in this attempt."""


def idempotency_key(task_id: str, name: str) -> str:
    """The key a step's side effects can be deduplicated by: the same in every attempt."""
    return f"{task_id}/{name}"


class TaskContext:
    """One attempt's view of its task: ``step``, ``state`` + ``checkpoint``, ``progress``."""

    def __init__(
        self,
        *,
        task_id: str,
        attempt: int,
        node: str,
        journal: Journal,
        checkpoint: Checkpoint | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise InvalidValue("attempt", attempt, "must be an integer >= 1")
        self._task_id = task_id
        self._attempt = attempt
        self._node = node
        self._journal = journal
        self._clock = clock
        view = journal.read()
        self._committed: dict[str, StepRecord] = dict(view.steps)
        self._pending: list[StepRecord] = []
        self._seen: set[str] = set()
        self._writing = trio.Lock()  # one commit at a time: journals number commits in order
        self._fraction = view.progress
        self._last = (view.state or encode({}, "state"), view.progress)  # what is committed
        self.state: dict[str, Any] = {} if view.state is None else decode(view.state)
        """Task state, restored on resume; committed with every checkpoint."""
        self.replayed: list[str] = []
        """Steps whose results came from the journal in this attempt (not run again)."""
        self.ran: list[str] = []
        """Steps this attempt ran."""
        self.current_key: str | None = None
        """The idempotency key of the step running now (None between steps)."""
        self._cadence = Cadence(checkpoint or EveryStep(), clock(), view.progress)

    @property
    def task_id(self) -> str:
        """The task's id (the same in every attempt)."""
        return self._task_id

    @property
    def attempt(self) -> int:
        """This attempt's number (1 = first)."""
        return self._attempt

    @property
    def node(self) -> str:
        """The node this attempt runs on."""
        return self._node

    @property
    def fraction(self) -> float:
        """The progress reported so far (0..1)."""
        return self._fraction

    def key(self, name: str) -> str:
        """The idempotency key of step ``name``."""
        return idempotency_key(self._task_id, name)

    def progress(self, fraction: float) -> None:
        """Report progress in [0, 1]; committed with the next checkpoint."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise InvalidValue("progress", fraction, "must be a number in [0, 1]")
        if not 0.0 <= fraction <= 1.0:
            raise InvalidValue("progress", fraction, "must be a number in [0, 1]")
        self._fraction = max(self._fraction, float(fraction))
        self._cadence.progressed(self._fraction)

    async def step(self, name: str, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` once for this task (sync ``fn`` in a thread), commit its
        result, and return it; a step already committed returns its result without running."""
        if not isinstance(name, str) or not name:
            raise StepError(f"step name {name!r}: must be a non-empty string")
        if name in self._seen:
            raise StepError(f"step {name!r} ran already in this attempt: step names must be unique")
        self._seen.add(name)
        done = self._committed.get(name)
        if done is not None:
            self.replayed.append(name)
            return decode(done.value)
        if self._pending and self._cadence.due(self._clock()):  # e.g. a milestone just passed
            await self.checkpoint()
        with step_span(self._task_id, self._attempt, name):
            self.current_key = self.key(name)
            try:
                if inspect.iscoroutinefunction(fn):
                    result = await fn(*args, **kwargs)
                else:
                    result = await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
            finally:
                self.current_key = None
            data = encode(result, key_path("steps", name))
            self._pending.append(StepRecord(name, self.key(name), data, self._attempt))
            self.ran.append(name)
            if self._cadence.due(self._clock()):
                await self.checkpoint()
        return decode(data)

    async def checkpoint(self) -> None:
        """Commit the uncommitted step results, ``state`` and progress now (after a commit
        another trio task of the attempt started, which it waits for)."""
        async with self._writing:
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        state = encode(self.state, "state")
        if not self._pending and (state, self._fraction) == self._last:
            return  # nothing new: no write
        taken = tuple(self._pending)
        commit = Commit(self._attempt, taken, state, self._fraction)
        await trio.to_thread.run_sync(self._journal.commit, commit)
        self._last = (state, commit.progress)
        for s in taken:
            self._committed[s.name] = s
        # only what this commit carried: a step that ended meanwhile (another trio task of the
        # same attempt) stays pending until a commit holds it
        self._pending = [s for s in self._pending if s.name not in self._committed]
        self._cadence.committed(self._clock())

    async def record(self, outcome: Outcome) -> None:
        """Record how this attempt ended (after its last checkpoint)."""
        async with self._writing:
            await trio.to_thread.run_sync(self._journal.finish, outcome)
