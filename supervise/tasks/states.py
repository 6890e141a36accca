"""The task state machine: explicit states, reason codes, and the transitions allowed between them.

Every move is a `Transition` (from, to, reason, time) appended to a task's history; a move the
table does not allow — or allows only for other reasons — is refused with a one-line
`InvalidTransition`, so a task's history is always a walk through `ALLOWED`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping

import attrs

from supervise._validation import InvalidValue, enum_value, instance_of, number


class TaskState(enum.StrEnum):
    """Where a task is (DESIGN §9)."""

    PENDING = "pending"  # waiting for a slot (new, requeued after a loss, or retrying)
    ASSIGNED = "assigned"  # a node/worker was chosen; not started yet
    RUNNING = "running"  # an attempt is executing steps
    PAUSED = "paused"  # checkpointed and stopped on request; resumes on `resume`
    COMPLETED = "completed"  # returned; its result is committed
    FAILED = "failed"  # gave up: a non-retryable error, retries or losses exhausted
    CANCELLED = "cancelled"  # stopped on request, for good


TERMINAL: frozenset[TaskState] = frozenset(
    {TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED}
)
"""States a task never leaves."""


class Reason(enum.StrEnum):
    """Why a task moved: each transition carries one."""

    SUBMITTED = "submitted"  # the first state
    PLACED = "placed"  # pending -> assigned
    STARTED = "started"  # assigned -> running
    RETURNED = "returned"  # running -> completed
    APP_ERROR = "app_error"  # running -> pending: the task raised; retried after a backoff
    NON_RETRYABLE = "non_retryable"  # running -> failed: an error type the policy never retries
    RETRIES_EXHAUSTED = "retries_exhausted"  # running -> failed: max_attempts used up
    NODE_LOST = "node_lost"  # assigned/running -> pending: its node or worker died
    DEAD_LETTER = "dead_letter"  # assigned/running -> failed: lost too often (poison task)
    START_FAILED = "start_failed"  # assigned -> pending: the worker could not be started
    PAUSE_REQUESTED = "pause_requested"  # running/pending/assigned -> paused
    RESUME_REQUESTED = "resume_requested"  # paused -> pending
    CANCEL_REQUESTED = "cancel_requested"  # any live state -> cancelled


_P, _A, _R, _PA = TaskState.PENDING, TaskState.ASSIGNED, TaskState.RUNNING, TaskState.PAUSED
_C, _F, _X = TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED

ALLOWED: Mapping[tuple[TaskState, TaskState], frozenset[Reason]] = {
    (_P, _A): frozenset({Reason.PLACED}),
    (_P, _PA): frozenset({Reason.PAUSE_REQUESTED}),
    (_P, _X): frozenset({Reason.CANCEL_REQUESTED}),
    (_A, _R): frozenset({Reason.STARTED}),
    (_A, _P): frozenset({Reason.NODE_LOST, Reason.START_FAILED}),
    (_A, _F): frozenset({Reason.DEAD_LETTER}),
    (_A, _PA): frozenset({Reason.PAUSE_REQUESTED}),
    (_A, _X): frozenset({Reason.CANCEL_REQUESTED}),
    (_R, _C): frozenset({Reason.RETURNED}),
    (_R, _P): frozenset({Reason.APP_ERROR, Reason.NODE_LOST}),
    (_R, _F): frozenset({Reason.NON_RETRYABLE, Reason.RETRIES_EXHAUSTED, Reason.DEAD_LETTER}),
    (_R, _PA): frozenset({Reason.PAUSE_REQUESTED}),
    (_R, _X): frozenset({Reason.CANCEL_REQUESTED}),
    (_PA, _P): frozenset({Reason.RESUME_REQUESTED}),
    (_PA, _X): frozenset({Reason.CANCEL_REQUESTED}),
}
"""Every allowed move and the reasons it may carry; nothing leaves a terminal state."""


class InvalidTransition(ValueError):
    """A move the state machine does not allow (one line: task, from, to, reason)."""


def _source(value: object) -> TaskState | None:
    return None if value is None else enum_value(TaskState, "source", value)


def _target(value: object) -> TaskState:
    return enum_value(TaskState, "target", value)


def _reason(value: object) -> Reason:
    return enum_value(Reason, "reason", value)


@attrs.frozen(slots=True)
class Transition:
    """One move of a task: from where to where, why, when — ``at`` on the caller's clock (trio's
    in the runner: virtual in tests) and ``wall_time`` (seconds since the epoch)."""

    source: TaskState | None = attrs.field(converter=_source)
    target: TaskState = attrs.field(converter=_target)
    reason: Reason = attrs.field(converter=_reason)
    at: float = attrs.field(validator=number(ge=0))
    detail: str = attrs.field(default="", validator=instance_of(str))
    wall_time: float = attrs.field(factory=time.time, validator=number(ge=0))


def check(task_id: str, source: TaskState, target: TaskState, reason: Reason) -> None:
    """Raise `InvalidTransition` unless ``source -> target`` for ``reason`` is allowed."""
    reasons = ALLOWED.get((source, target))
    if reasons is None:
        why = "it is final" if source in TERMINAL else f"{target} is not reachable from it"
        raise InvalidTransition(f"task {task_id}: {source} -> {target} refused: {why}")
    if reason not in reasons:
        allowed = ", ".join(sorted(reasons))
        raise InvalidTransition(
            f"task {task_id}: {source} -> {target} refused for reason {reason} (allowed: {allowed})"
        )


@attrs.define(slots=True)
class Lifecycle:
    """A task's state and the history of how it got there; `move` is the only way to change it."""

    task_id: str
    history: list[Transition]

    @classmethod
    def submitted(cls, task_id: str, at: float) -> Lifecycle:
        """A new task, pending since ``at``."""
        if not isinstance(task_id, str) or not task_id:
            raise InvalidValue("task_id", task_id, "must be a non-empty string")
        return cls(task_id, [Transition(None, TaskState.PENDING, Reason.SUBMITTED, at)])

    @property
    def state(self) -> TaskState:
        """The current state."""
        return self.history[-1].target

    @property
    def since(self) -> float:
        """When the task entered its current state."""
        return self.history[-1].at

    @property
    def terminal(self) -> bool:
        """Whether the task is done for good."""
        return self.state in TERMINAL

    def move(self, target: TaskState, reason: Reason, at: float, detail: str = "") -> Transition:
        """Move to ``target`` for ``reason``; refuses (InvalidTransition) what `ALLOWED` does not
        list, and a time earlier than the last move."""
        target = enum_value(TaskState, "target", target)
        reason = enum_value(Reason, "reason", reason)
        check(self.task_id, self.state, target, reason)
        if at < self.since:
            raise InvalidTransition(
                f"task {self.task_id}: {self.state} -> {target} at {at:g} is earlier than "
                f"the last move ({self.since:g})"
            )
        t = Transition(self.state, target, reason, at, detail)
        self.history.append(t)
        return t

    def count(self, reason: Reason) -> int:
        """How many moves carried ``reason`` (e.g. NODE_LOST: losses so far)."""
        return sum(1 for t in self.history if t.reason is reason)
