"""The single-node runner: runs a task's attempts until it completes or gives up.

`TaskRunner` owns the task's `Lifecycle` and the retry decisions; a launcher runs one attempt
and says how it ended. `WorkerProcess` runs each attempt in a fresh OS process under the
runtime (`supervise.runtime.OsProcess`: no orphans, a crash is an exit reason, never the
parent's problem) against a journal in this process's RAM (a `JournalHost`) or on disk;
`InProcess` runs it in this trio run (tests, and tasks that need no isolation).
"""

from __future__ import annotations

import enum
import os
import random
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import attrs
import trio

from supervise._validation import enum_value
from supervise.runtime.osprocess import OsProcess, ProcessHandle
from supervise.runtime.private import private_dirs
from supervise.snapshot.protocol import AGENT_ENV, TOKEN_ENV
from supervise.tasks.attempt import BadTarget, failure, resolve, run_attempt
from supervise.tasks.context import TaskContext
from supervise.tasks.host import JournalHost, open_journal_host
from supervise.tasks.journal import DiskJournal, Journal, MemoryJournal, Outcome
from supervise.tasks.layout import JOURNAL_DIR, SHARD_ENV, SPEC_FILE
from supervise.tasks.policy import Verdict, type_name
from supervise.tasks.spec import TaskSpec
from supervise.tasks.states import Lifecycle, Reason, TaskState, Transition, check
from supervise.tasks.telemetry import attempt_span, trace_env
from supervise.tasks.values import UnsupportedValue, decode
from supervise.telemetry import Attr

_ALWAYS_FINAL = frozenset(
    {type_name(UnsupportedValue), type_name(BadTarget)}
)  # retrying won't help
T = TypeVar("T")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the worker runs this same supervise


class AttemptOutcome(enum.StrEnum):
    """How an attempt ended (``supervise.task.outcome`` on its span)."""

    RETURNED = "returned"  # the task function returned
    RAISED = "raised"  # it raised (an application error)
    LOST = "lost"  # its worker or node died without an outcome
    STOPPED = "stopped"  # paused or cancelled on request


@attrs.frozen(slots=True)
class AttemptEnd:
    """How an attempt ended: its recorded ``outcome``, or None and why it was ``lost``."""

    outcome: Outcome | None
    lost: str = ""


def _attempt_outcome(end: AttemptEnd | None) -> AttemptOutcome:
    if end is None:
        return AttemptOutcome.STOPPED
    if end.outcome is None:
        return AttemptOutcome.LOST
    return AttemptOutcome.RETURNED if end.outcome.ok else AttemptOutcome.RAISED


class Launcher(Protocol):
    """Runs attempt ``n`` of a task to its end."""

    node: str

    async def __call__(self, attempt: int) -> AttemptEnd: ...


class InProcess:
    """Attempts in this trio run, against ``journal`` (a `MemoryJournal` by default)."""

    def __init__(self, spec: TaskSpec, journal: Journal | None = None, node: str = "local") -> None:
        self.spec = spec
        self.journal: Journal = MemoryJournal() if journal is None else journal
        self.node = node

    async def __call__(self, attempt: int) -> AttemptEnd:
        try:
            fn = resolve(self.spec.target, self.spec.args, self.spec.kwargs)
        except BadTarget as exc:
            self.journal.finish(failure(attempt, exc))
            return AttemptEnd(self.journal.outcome())
        ctx = TaskContext(
            task_id=self.spec.task_id,
            attempt=attempt,
            node=self.node,
            journal=self.journal,
            checkpoint=self.spec.policy.checkpoint,
        )
        try:
            return AttemptEnd(await run_attempt(fn, ctx, self.spec.args, self.spec.kwargs))
        except trio.Cancelled:  # paused or cancelled: commit what the attempt finished
            with trio.CancelScope(shield=True):
                await ctx.checkpoint()
            raise


class WorkerProcess:
    """Attempts in fresh worker processes; the journal is shard ``shard`` of ``host`` (RAM
    arenas of this process) or, without a host, on disk in ``task_dir`` (the spec is there too).

    ``env`` is added to the worker's environment; ``on_started`` gets each attempt's
    `ProcessHandle` (its pid) as it starts.
    """

    def __init__(
        self,
        spec: TaskSpec,
        task_dir: str | os.PathLike[str],
        *,
        node: str = "local",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        on_started: Callable[[int, ProcessHandle], None] | None = None,
        shutdown: float = 5.0,
        host: JournalHost | None = None,
        shard: int = 0,
    ) -> None:
        self.spec = spec
        self.task_dir = Path(task_dir)
        self.node = node
        self.env = dict(env or {})
        self.cwd = cwd
        self.on_started = on_started
        self.shutdown = shutdown
        self.host = host
        self.shard = shard
        private_dirs(self.task_dir)  # 0700: the spec's arguments and the journal are the user's
        spec.save(self.task_dir / SPEC_FILE)

    def _env(self, attempt: int) -> dict[str, str]:
        env = {**self.env, "PYTHONPATH": pythonpath(self.env.get("PYTHONPATH", ""))}
        env.update(trace_env())  # the worker's step spans: children of this attempt's span
        env.update(journal_env(self.host, self.shard, attempt))
        return env

    def _outcome(self) -> Outcome | None:
        if self.host is not None:
            return self.host.journal(self.shard).outcome()
        return DiskJournal(self.task_dir / JOURNAL_DIR).outcome()

    async def __call__(self, attempt: int) -> AttemptEnd:
        proc = OsProcess(
            [
                sys.executable,
                "-m",
                "supervise.tasks._worker",
                str(self.task_dir),
                str(attempt),
                self.node,
            ],
            env=self._env(attempt),
            cwd=self.cwd,
        )
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(
                lambda task_status: proc.run(
                    shutdown=self.shutdown,
                    label=f"task {self.spec.task_id} attempt {attempt}",
                    task_status=task_status,
                )
            )
            if self.on_started is not None:
                self.on_started(attempt, handle)
            reason = await handle.wait()
        outcome = await trio.to_thread.run_sync(self._outcome)
        if outcome is not None and outcome.attempt == attempt:
            return AttemptEnd(outcome)
        return AttemptEnd(None, lost=f"worker exited without an outcome ({reason})")


def pythonpath(given: str = "") -> str:
    """A worker's PYTHONPATH: this same supervise first, then ``given``, then this process's."""
    parts = [
        _PACKAGE_ROOT,
        *given.split(os.pathsep),
        *os.environ.get("PYTHONPATH", "").split(os.pathsep),
    ]
    return os.pathsep.join(p for p in parts if p)


def journal_env(host: JournalHost | None, shard: int, attempt: int) -> dict[str, str]:
    """Where a worker's attempt writes its journal: shard ``shard`` of ``host`` under a fresh
    token (earlier attempts' tokens stop working), or on disk (``host`` None: none inherited)."""
    if host is None:
        return {AGENT_ENV: "", SHARD_ENV: "", TOKEN_ENV: ""}
    return {
        AGENT_ENV: host.endpoint,
        SHARD_ENV: str(shard),
        TOKEN_ENV: host.token(shard, attempt),
    }


@attrs.frozen(slots=True)
class TaskResult:
    """How a task ended: its final state, its value (completed) or last error, its history."""

    task_id: str
    state: TaskState
    value: Any
    error: str
    attempts: int
    history: tuple[Transition, ...]


class TaskFailed(RuntimeError):
    """A task that did not complete (one line: id, state, reason, last error)."""


class TaskRunner:
    """Runs ``spec`` through ``launcher`` until it completes or gives up: application errors
    retry with the policy's backoff (virtual-time friendly: trio's clock), losses requeue
    without spending that budget, up to ``max_losses``. `pause`, `resume` and `cancel` may be
    called from other trio tasks while `run` runs."""

    def __init__(
        self,
        spec: TaskSpec,
        launcher: Launcher,
        *,
        on_transition: Callable[[Transition], None] | None = None,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.spec = spec
        self.launcher = launcher
        self.on_transition = on_transition
        self.uniform = uniform
        self.lifecycle = Lifecycle.submitted(spec.task_id, trio.current_time())
        self.attempts = 0
        self.errors = 0
        self.losses = 0
        self._stop: Reason | None = None  # a pause or cancel asked for, not yet done
        self._resumed = False
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None  # the attempt or backoff in progress
        self._emit(self.lifecycle.history[-1])

    @property
    def state(self) -> TaskState:
        """The task's state now."""
        return self.lifecycle.state

    def _emit(self, t: Transition) -> None:
        if self.on_transition is not None:
            self.on_transition(t)

    def _move(self, target: TaskState, reason: Reason, detail: str = "") -> None:
        self._emit(self.lifecycle.move(target, reason, trio.current_time(), detail))

    # -- requests from other tasks: pause, resume, cancel ----------------------------------

    def pause(self) -> None:
        """Stop the task where it is (its worker is stopped; committed steps stay) until
        `resume`; a one-line InvalidTransition when it cannot be paused."""
        if self._stop is not Reason.PAUSE_REQUESTED:
            check(self.spec.task_id, self.state, TaskState.PAUSED, Reason.PAUSE_REQUESTED)
        self._request(Reason.PAUSE_REQUESTED)

    def resume(self) -> None:
        """Let a paused task go on (from its journal)."""
        if self._stop is Reason.PAUSE_REQUESTED and self.state is not TaskState.PAUSED:
            # asked to pause, not paused yet: the attempt may already be stopping, so the
            # pause goes through and the task goes on at once
            self._resumed = True
            return
        check(self.spec.task_id, self.state, TaskState.PENDING, Reason.RESUME_REQUESTED)
        self._resumed = True
        self._wake.set()

    def cancel(self) -> None:
        """Stop the task for good (its worker is stopped)."""
        check(self.spec.task_id, self.state, TaskState.CANCELLED, Reason.CANCEL_REQUESTED)
        self._request(Reason.CANCEL_REQUESTED)

    def _request(self, reason: Reason) -> None:
        if self._stop is not Reason.CANCEL_REQUESTED:
            self._stop = reason
        if self._scope is not None:
            self._scope.cancel()
        self._wake.set()

    async def _honour_requests(self) -> None:
        """At a boundary (no attempt running): pause (and wait for resume) or cancel. A request
        that came as the attempt ended (it completed or failed for good) changes nothing."""
        if self.lifecycle.terminal:
            self._stop = None
            return
        if self._stop is Reason.PAUSE_REQUESTED:
            self._move(TaskState.PAUSED, Reason.PAUSE_REQUESTED)
            self._stop = None
            while not self._resumed and self._stop is not Reason.CANCEL_REQUESTED:
                self._wake = trio.Event()
                await self._wake.wait()
            if self._stop is not Reason.CANCEL_REQUESTED:
                self._resumed = False
                self._move(TaskState.PENDING, Reason.RESUME_REQUESTED)
        if self._stop is Reason.CANCEL_REQUESTED:
            self._move(TaskState.CANCELLED, Reason.CANCEL_REQUESTED)

    async def _interruptible(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """``await fn(*args)`` unless a pause or cancel request stops it first (None then)."""
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._stop is not None:
                scope.cancel()
            try:
                return await fn(*args)
            finally:
                self._scope = None
        return None

    async def run(self) -> TaskResult:
        """Run to a final state; the result says which (never raises for the task's errors)."""
        retry = self.spec.policy.retry
        last_error = ""
        value: Any = None
        while True:
            await self._honour_requests()
            if self.lifecycle.terminal:
                break
            self.attempts += 1
            self._move(TaskState.ASSIGNED, Reason.PLACED, f"node={self.launcher.node}")
            self._move(TaskState.RUNNING, Reason.STARTED, f"attempt={self.attempts}")
            with attempt_span(
                self.spec.task_id, self.attempts, self.launcher.node, self.spec.target
            ) as span:
                end = await self._interruptible(self.launcher, self.attempts)
                span.set_attribute(Attr.TASK_OUTCOME, _attempt_outcome(end))
            if end is None:
                continue  # stopped on request: neither an error nor a loss
            outcome = end.outcome
            if outcome is None:
                self.losses += 1
                last_error = end.lost
                if retry.dead_letter(self.losses):
                    self._move(TaskState.FAILED, Reason.DEAD_LETTER, f"{self.losses} losses")
                else:
                    self._move(TaskState.PENDING, Reason.NODE_LOST, end.lost)
                continue
            if outcome.ok:
                assert outcome.value is not None
                value = decode(outcome.value)
                self._move(TaskState.COMPLETED, Reason.RETURNED)
                continue
            self.errors += 1
            last_error = f"{outcome.error_type}: {outcome.message}"
            verdict = retry.verdict(self.errors, outcome.error_mro)
            if _ALWAYS_FINAL.intersection(outcome.error_mro):
                verdict = Verdict.NON_RETRYABLE
            if verdict is Verdict.NON_RETRYABLE:
                self._move(TaskState.FAILED, Reason.NON_RETRYABLE, last_error)
            elif verdict is Verdict.EXHAUSTED:
                self._move(TaskState.FAILED, Reason.RETRIES_EXHAUSTED, last_error)
            else:
                delay = retry.delay(self.errors, self.uniform())
                self._move(
                    TaskState.PENDING, Reason.APP_ERROR, f"{last_error}; retry in {delay:g}s"
                )
                await self._interruptible(trio.sleep, delay)
        return TaskResult(
            self.spec.task_id,
            self.state,
            value,
            "" if self.state is TaskState.COMPLETED else last_error,
            self.attempts,
            tuple(self.lifecycle.history),
        )


def unwrap(result: TaskResult) -> Any:
    """The value of a completed task; `TaskFailed` (one line) otherwise."""
    if result.state is not TaskState.COMPLETED:
        reason = result.history[-1].reason
        raise TaskFailed(f"task {result.task_id} {result.state} ({reason}): {result.error}")
    return result.value


class JournalKind(enum.StrEnum):
    """Where `run_local` keeps a task's journal."""

    RAM = "ram"  # shared-memory arenas of the running process (a `JournalHost`)
    DISK = "disk"  # checksummed commit files in the task's directory


async def run_local(
    spec: TaskSpec,
    task_dir: str | os.PathLike[str],
    *,
    on_transition: Callable[[Transition], None] | None = None,
    journal: JournalKind | str = JournalKind.RAM,
    shm_dir: str | os.PathLike[str] = "/dev/shm",
    **worker: Any,
) -> TaskResult:
    """Run ``spec`` to its end in worker processes on this machine (``worker``:
    `WorkerProcess` options), its journal in this process's RAM (arenas in ``shm_dir``) or in
    ``task_dir`` on disk."""
    kind = enum_value(JournalKind, "journal", journal)
    if kind is JournalKind.DISK:
        launcher = WorkerProcess(spec, task_dir, **worker)
        return await TaskRunner(spec, launcher, on_transition=on_transition).run()
    async with open_journal_host(shm_dir) as host:
        launcher = WorkerProcess(spec, task_dir, host=host, **worker)
        return await TaskRunner(spec, launcher, on_transition=on_transition).run()
