"""The farm's task table (pure, no I/O): every task's spec, needs, state machine, attempt,
fence, lease, node, replicas, progress, result and errors, and the moves the coordinator makes.

Times: ``at`` is the table's clock (wall seconds in the agent, trio's in tests), stored in the
history and replicated; ``now`` is the coordinator's monotonic clock (trio's), used only for
leases and backoff, never replicated (a new coordinator starts its leases afresh). Each change
bumps the record's ``rev``; `TaskTable.dirty` lists what changed since the last `flushed`, so
the coordinator makes it durable (store or peers) before acting on it; `merge` keeps the
highest revision of each task, so a new coordinator loses and duplicates nothing.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import msgpack

from supervise.tasks.farm_messages import AttemptPhase, ControlAction, StopWhy, Update
from supervise.tasks.policy import RetryPolicy, Verdict
from supervise.tasks.resources import Resources
from supervise.tasks.scheduler import Request
from supervise.tasks.spec import TaskSpec
from supervise.tasks.states import (
    TERMINAL,
    InvalidTransition,
    Lifecycle,
    Reason,
    TaskState,
    Transition,
)

_LIVE_ON_NODE = frozenset({TaskState.ASSIGNED, TaskState.RUNNING})

#: The fields of an encoded record (`TaskRecord.to_bytes`).
_FIELDS = frozenset(
    {
        "id", "spec", "target", "needs", "labels", "priority", "seq", "max_attempts",
        "non_retryable", "history", "attempt", "fence", "node", "replicas", "progress",
        "steps", "result", "error", "errors", "losses", "not_before", "avoid", "stop",
        "resume_after", "rev",
    }
)  # fmt: skip


class TableError(ValueError):
    """A request the table refuses (one line): unknown task, a state that does not allow it."""


class UnknownTask(TableError):
    """No task with this id."""


class UpdateVerdict(enum.StrEnum):
    """What the coordinator answers a node's update."""

    OK = "ok"
    STALE = "stale"  # not the task's current attempt: a zombie


@attrs.define(slots=True)
class TaskRecord:
    """One task in the table (mutable; only `TaskTable` changes it)."""

    spec: bytes
    target: str
    needs: Resources
    labels: frozenset[str]
    priority: int
    seq: int
    max_attempts: int
    life: Lifecycle
    non_retryable: tuple[str, ...] = ()
    attempt: int = 0  # attempts started so far (the current one's number while on a node)
    fence: int = 0  # strictly increasing on every (re)assignment
    node: int | None = None
    replicas: frozenset[int] = frozenset()
    progress: float = 0.0
    steps: int = 0
    result: bytes | None = None
    error: str | None = None
    errors: int = 0  # application errors (the retry budget)
    losses: int = 0  # node losses and start failures (outside the retry budget)
    not_before: float = 0.0  # table clock: no placement before (backoff)
    avoid: frozenset[int] = frozenset()  # the node just lost
    stop: StopWhy | None = None  # a pause asked of the running attempt, not confirmed yet
    resume_after: bool = False  # resumed before the asked pause took effect
    rev: int = 0

    @property
    def task_id(self) -> str:
        return self.life.task_id

    @property
    def state(self) -> TaskState:
        return self.life.state

    @property
    def reason(self) -> Reason:
        return self.life.history[-1].reason

    def to_bytes(self) -> bytes:
        """The record as replicated (msgpack)."""
        packed: bytes = msgpack.packb(
            {
                "id": self.task_id,
                "spec": self.spec,
                "target": self.target,
                "needs": self.needs.to_json(),
                "labels": sorted(self.labels),
                "priority": self.priority,
                "seq": self.seq,
                "max_attempts": self.max_attempts,
                "non_retryable": list(self.non_retryable),
                "history": [
                    [
                        None if t.source is None else str(t.source),
                        str(t.target),
                        str(t.reason),
                        t.at,
                        t.detail,
                        t.wall_time,
                    ]
                    for t in self.life.history
                ],
                "attempt": self.attempt,
                "fence": self.fence,
                "node": self.node,
                "replicas": sorted(self.replicas),
                "progress": self.progress,
                "steps": self.steps,
                "result": self.result,
                "error": self.error,
                "errors": self.errors,
                "losses": self.losses,
                "not_before": self.not_before,
                "avoid": sorted(self.avoid),
                "stop": None if self.stop is None else str(self.stop),
                "resume_after": self.resume_after,
                "rev": self.rev,
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> TaskRecord:
        """The record `to_bytes` wrote; TableError names what was wrong."""
        try:
            d = msgpack.unpackb(data, raw=False)
            history = [
                Transition(src, tgt, reason, at, detail, wall)
                for src, tgt, reason, at, detail, wall in d["history"]
            ]
            return cls(
                spec=d["spec"],
                target=d["target"],
                needs=Resources.from_json(d["needs"]),
                labels=frozenset(d["labels"]),
                priority=d["priority"],
                seq=d["seq"],
                max_attempts=d["max_attempts"],
                life=Lifecycle(d["id"], history),
                non_retryable=tuple(d["non_retryable"]),
                attempt=d["attempt"],
                fence=d["fence"],
                node=d["node"],
                replicas=frozenset(d["replicas"]),
                progress=d["progress"],
                steps=d["steps"],
                result=d["result"],
                error=d["error"],
                errors=d["errors"],
                losses=d["losses"],
                not_before=d["not_before"],
                avoid=frozenset(d["avoid"]),
                stop=None if d["stop"] is None else StopWhy(d["stop"]),
                resume_after=d["resume_after"],
                rev=d["rev"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TableError(f"bad task record: {type(e).__name__}: {e}") from None


@attrs.frozen(slots=True)
class StopOrder:
    """A `farm.stop` the coordinator must send: to ``node``, for the attempt under ``fence``."""

    node: int
    task_id: str
    fence: int
    why: StopWhy


@attrs.frozen(slots=True)
class Moved:
    """A task taken off its node (lost, lease expired): where it went and what it held."""

    task_id: str
    node: int
    state: TaskState
    replicas: frozenset[int]


class TaskTable:
    """Every task of the farm, and the only code that changes them."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        # records taken encoded (`merge_encoded`) and not decoded yet: task id -> (rev, seq,
        # bytes), each newer than the decoded record of that task, if any
        self._raw: dict[str, tuple[int, int, bytes]] = {}
        self._dirty: set[str] = set()
        self._seq = 0
        # indexes by state, kept by `_index` (the coordinator asks for these every round)
        self._pending: set[str] = set()
        self._on_nodes: set[str] = set()
        self._counts: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        self._state: dict[str, TaskState] = {}

    def _index(self, rec: TaskRecord) -> None:
        tid, state = rec.task_id, rec.state
        old = self._state.get(tid)
        if old is state:
            return
        if old is not None:
            self._counts[old] -= 1
        self._counts[state] += 1
        self._state[tid] = state
        (self._pending.add if state is TaskState.PENDING else self._pending.discard)(tid)
        (self._on_nodes.add if state in _LIVE_ON_NODE else self._on_nodes.discard)(tid)

    # -- reading ---------------------------------------------------------------------------

    def __contains__(self, task_id: object) -> bool:
        self._settle()
        return task_id in self._tasks

    def __len__(self) -> int:
        self._settle()
        return len(self._tasks)

    def __iter__(self) -> Iterator[TaskRecord]:
        self._settle()
        return iter(sorted(self._tasks.values(), key=lambda r: r.seq))

    def get(self, task_id: str) -> TaskRecord:
        """The task, or UnknownTask."""
        self._settle()
        rec = self._tasks.get(task_id)
        if rec is None:
            raise UnknownTask(f"no task {task_id!r}")
        return rec

    def find(self, task_id: str) -> TaskRecord | None:
        """The task, or None."""
        self._settle()
        return self._tasks.get(task_id)

    def saved(self, task_id: str) -> bool:
        """Whether the task has no change since the last `flushed` (its record is durable)."""
        return task_id not in self._dirty

    def counts(self) -> dict[TaskState, int]:
        """Tasks by state (every state listed)."""
        self._settle()
        return dict(self._counts)

    def on_node(self, node: int) -> list[TaskRecord]:
        """The tasks assigned to or running on ``node``."""
        self._settle()
        return [r for r in self.live_on_nodes() if r.node == node]

    def live_on_nodes(self) -> list[TaskRecord]:
        """Every task assigned or running somewhere."""
        self._settle()
        return [self._tasks[t] for t in self._on_nodes]

    def requests(self, at: float, limit: int | None = None) -> list[Request]:
        """Placement requests of the pending tasks whose backoff is over at ``at``: the
        first ``limit`` by priority, then submission order (all: None)."""
        self._settle()
        ready = [r for r in (self._tasks[t] for t in self._pending) if r.not_before <= at]
        if limit is not None and len(ready) > limit:
            ready = heapq.nsmallest(limit, ready, key=lambda r: (-r.priority, r.seq))
        return [
            Request(
                r.task_id,
                r.needs,
                r.labels,
                r.priority,
                r.seq,
                replica_on=r.replicas,
                avoid=r.avoid,
            )
            for r in ready
        ]

    def next_ready(self, at: float) -> float | None:
        """The earliest backoff end after ``at`` among pending tasks (None: none waiting)."""
        self._settle()
        waits = [r.not_before for r in (self._tasks[t] for t in self._pending) if r.not_before > at]
        return min(waits, default=None)

    # -- durability ------------------------------------------------------------------------

    @property
    def dirty(self) -> list[TaskRecord]:
        """Records changed since the last `flushed`."""
        self._settle()
        return [self._tasks[t] for t in sorted(self._dirty)]

    def flushed(self, revisions: Mapping[str, int]) -> None:
        """These tasks are durable at these revisions (a task changed since stays dirty)."""
        self._settle()
        for task_id, rev in revisions.items():
            rec = self._tasks.get(task_id)
            if rec is not None and rec.rev == rev:
                self._dirty.discard(task_id)

    def merge(self, records: Iterable[TaskRecord]) -> int:
        """Keep each task's highest revision (a replica's table, a new coordinator's pull);
        how many records were taken."""
        self._settle()
        taken = 0
        for rec in records:
            mine = self._tasks.get(rec.task_id)
            if mine is None or rec.rev > mine.rev:
                self._tasks[rec.task_id] = rec
                self._index(rec)
                self._seq = max(self._seq, rec.seq)
                taken += 1
        return taken

    def merge_encoded(self, blobs: Iterable[bytes]) -> int:
        """`merge` of records as `TaskRecord.to_bytes` wrote them (a peer's replica of the
        coordinator's table): only each record's id, revision and sequence are read now; the
        newest copy of each task is kept as bytes and decoded when the table is next read or
        changed (a take-over, a pull, a query), so a peer spends next to nothing per update.
        How many records were taken; TableError for bytes that are no task record."""
        taken = 0
        for data in blobs:
            task_id, rev, seq = _peek(data)
            held = self._raw.get(task_id)
            mine = self._tasks.get(task_id)
            newest = max(-1 if held is None else held[0], -1 if mine is None else mine.rev)
            if rev > newest:
                self._raw[task_id] = (rev, seq, data)
                self._seq = max(self._seq, seq)
                taken += 1
        return taken

    def _settle(self) -> None:
        """Decode the records `merge_encoded` kept (a record whose fields do not decode is
        left out: the copy decoded before, if any, stays)."""
        if not self._raw:
            return
        raw, self._raw = self._raw, {}
        for _rev, _seq, data in raw.values():
            try:
                rec = TaskRecord.from_bytes(data)
            except TableError:
                continue
            self._tasks[rec.task_id] = rec
            self._index(rec)

    def _touch(self, rec: TaskRecord) -> None:
        rec.rev += 1
        self._dirty.add(rec.task_id)

    def _move(
        self, rec: TaskRecord, target: TaskState, reason: Reason, at: float, detail: str = ""
    ) -> None:
        rec.life.move(target, reason, max(at, rec.life.since), detail)
        self._index(rec)
        self._touch(rec)

    # -- the moves -------------------------------------------------------------------------

    def submit(
        self,
        spec: TaskSpec,
        needs: Resources,
        at: float,
        *,
        labels: frozenset[str] = frozenset(),
        priority: int = 0,
        max_attempts: int = 3,
        non_retryable: tuple[str, ...] = (),
        spec_bytes: bytes | None = None,
    ) -> tuple[TaskRecord, bool]:
        """Queue a task; (its record, whether it is new). A second submit of the same id
        answers the task already there; with another target it is refused."""
        self._settle()
        old = self._tasks.get(spec.task_id)
        if old is not None:
            if old.target != spec.target:
                raise TableError(f"task {spec.task_id!r} exists, running {old.target}")
            return old, False
        self._seq += 1
        rec = TaskRecord(
            spec=spec.to_bytes() if spec_bytes is None else spec_bytes,
            target=spec.target,
            needs=needs,
            labels=labels,
            priority=priority,
            seq=self._seq,
            max_attempts=max_attempts,
            life=Lifecycle.submitted(spec.task_id, at),
            non_retryable=non_retryable,
        )
        self._tasks[rec.task_id] = rec
        self._index(rec)
        self._touch(rec)
        return rec, True

    def place(
        self,
        task_id: str,
        node: int,
        at: float,
        next_fence: Callable[[int], int] = lambda f: f + 1,
    ) -> TaskRecord:
        """pending -> assigned on ``node``: a new attempt under a new, higher fence
        (``next_fence(old)``, which must be greater)."""
        self._settle()
        rec = self.get(task_id)
        fence = next_fence(rec.fence)
        if fence <= rec.fence:
            raise TableError(f"task {task_id!r}: fence {fence} is not above {rec.fence}")
        self._move(rec, TaskState.ASSIGNED, Reason.PLACED, at, f"node {node}")
        rec.node = node
        rec.attempt += 1
        rec.fence = fence
        rec.avoid = frozenset()
        return rec

    def bump(self, rec: TaskRecord) -> None:
        """A new revision of ``rec``, saved at the next flush (a new coordinator re-broadcasts
        its table above every older copy)."""
        self._settle()
        self._touch(rec)

    def drop_unsaved(self, saved: Iterable[TaskRecord]) -> None:
        """Replace every change not saved yet by its saved version in ``saved`` (newest
        revision), or forget the task if none was saved: those changes were never
        acknowledged to anyone."""
        self._settle()
        newest: dict[str, TaskRecord] = {}
        for rec in saved:
            if rec.task_id not in newest or rec.rev > newest[rec.task_id].rev:
                newest[rec.task_id] = rec
        for task_id in list(self._dirty):
            old = self._tasks.pop(task_id)
            state = self._state.pop(task_id)
            self._counts[state] -= 1
            self._pending.discard(task_id)
            self._on_nodes.discard(task_id)
            self._dirty.discard(task_id)
            keep = newest.get(task_id)
            if keep is not None:
                self._tasks[task_id] = keep
                self._index(keep)
            del old

    def refused(self, task_id: str, fence: int, node: int, at: float, why: str) -> bool:
        """The node did not take the assignment under ``fence``: a start failure (back to
        pending, avoiding that node). False when that attempt is no longer current."""
        rec = self.current(task_id, fence, node)
        if rec is None or rec.state is not TaskState.ASSIGNED:
            return False
        self._start_failed(rec, node, at, why)
        return True

    def current(self, task_id: str, fence: int, node: int | None = None) -> TaskRecord | None:
        """The task if ``fence`` (from ``node``) is its current attempt's, else None (a
        zombie's: an older fence, or a task no longer on a node)."""
        self._settle()
        rec = self._tasks.get(task_id)
        if rec is None or rec.fence != fence or rec.state not in _LIVE_ON_NODE:
            return None
        if node is not None and rec.node != node:
            return None
        return rec

    def update(self, u: Update, at: float) -> UpdateVerdict:
        """Apply a node's report of an attempt; STALE when it is not the current attempt."""
        self._settle()
        rec = self.current(u.task_id, u.fence, u.node)
        if rec is None:
            return UpdateVerdict.STALE
        if u.replicas:
            rec.replicas = frozenset(u.replicas)
        rec.progress = max(rec.progress, u.progress)
        rec.steps = max(rec.steps, u.steps)
        phase = u.phase
        if phase is AttemptPhase.START_FAILED:
            self._start_failed(rec, u.node, at, u.error or "the worker could not be started")
            return UpdateVerdict.OK
        if rec.state is TaskState.ASSIGNED:
            self._move(rec, TaskState.RUNNING, Reason.STARTED, at, f"node {u.node}")
        if phase is AttemptPhase.COMPLETED:
            rec.result = b"" if u.result is None else u.result
            rec.progress = 1.0
            rec.node = None
            rec.stop = None
            self._move(rec, TaskState.COMPLETED, Reason.RETURNED, at)
        elif phase is AttemptPhase.ERRORED:
            self._errored(rec, u.error or "error", tuple(u.error_mro), at)
        elif phase is AttemptPhase.PAUSED:
            rec.node = None
            rec.stop = None
            self._move(rec, TaskState.PAUSED, Reason.PAUSE_REQUESTED, at)
            if rec.resume_after:
                rec.resume_after = False
                self._move(rec, TaskState.PENDING, Reason.RESUME_REQUESTED, at)
        elif phase is AttemptPhase.CANCELLED:
            rec.node = None
            rec.stop = None
            self._move(rec, TaskState.CANCELLED, Reason.CANCEL_REQUESTED, at)
        else:
            self._touch(rec)  # STARTED / PROGRESS: progress and replicas are news too
        return UpdateVerdict.OK

    def _start_failed(self, rec: TaskRecord, node: int, at: float, why: str) -> None:
        if rec.state is TaskState.RUNNING:  # it reported a start first: an error then
            self._errored(rec, why, (), at)
            return
        rec.losses += 1
        rec.node = None
        rec.error = why
        if rec.losses > RetryPolicy(max_losses=_MAX_LOSSES).max_losses:
            self._move(rec, TaskState.FAILED, Reason.DEAD_LETTER, at, why)
            return
        rec.avoid = frozenset({node})
        self._move(rec, TaskState.PENDING, Reason.START_FAILED, at, why)
        self._after_requeue(rec, at)

    def _errored(self, rec: TaskRecord, error: str, mro: tuple[str, ...], at: float) -> None:
        rec.errors += 1
        rec.error = error
        rec.node = None
        policy = RetryPolicy(max_attempts=rec.max_attempts)
        verdict = policy.verdict(rec.errors, mro)
        if set(rec.non_retryable).intersection(mro):
            verdict = Verdict.NON_RETRYABLE
        if verdict is Verdict.RETRY:
            rec.not_before = at + policy.delay(rec.errors)
            self._move(rec, TaskState.PENDING, Reason.APP_ERROR, at, error)
            self._after_requeue(rec, at)
        elif verdict is Verdict.NON_RETRYABLE:
            rec.stop = None
            self._move(rec, TaskState.FAILED, Reason.NON_RETRYABLE, at, error)
        else:
            rec.stop = None
            self._move(rec, TaskState.FAILED, Reason.RETRIES_EXHAUSTED, at, error)

    def _after_requeue(self, rec: TaskRecord, at: float) -> None:
        """A pause asked of the attempt that just ended takes effect now."""
        if rec.stop is StopWhy.PAUSE:
            rec.stop = None
            self._move(rec, TaskState.PAUSED, Reason.PAUSE_REQUESTED, at)
            if rec.resume_after:
                rec.resume_after = False
                self._move(rec, TaskState.PENDING, Reason.RESUME_REQUESTED, at)

    def lost(self, task_id: str, at: float, why: str) -> Moved | None:
        """The task's node is gone (membership) or its lease ran out: back to pending
        (preferring the nodes holding its replica), or dead-lettered after too many losses;
        None if it was not on a node."""
        self._settle()
        rec = self._tasks.get(task_id)
        if rec is None or rec.state not in _LIVE_ON_NODE or rec.node is None:
            return None
        node = rec.node
        rec.node = None
        rec.losses += 1
        rec.replicas = rec.replicas - {node}
        policy = RetryPolicy(max_losses=_MAX_LOSSES)
        if policy.dead_letter(rec.losses):
            rec.stop = None
            self._move(rec, TaskState.FAILED, Reason.DEAD_LETTER, at, why)
            rec.error = f"lost {rec.losses} times (dead letter): {why}"
        else:
            rec.avoid = frozenset({node})
            rec.not_before = at
            self._move(rec, TaskState.PENDING, Reason.NODE_LOST, at, why)
            self._after_requeue(rec, at)
        return Moved(task_id, node, rec.state, rec.replicas)

    def node_lost(self, node: int, at: float) -> list[Moved]:
        """Every task on ``node`` moved off it."""
        self._settle()
        out = []
        for rec in sorted(self.on_node(node), key=lambda r: r.seq):
            moved = self.lost(rec.task_id, at, f"node {node} lost")
            if moved is not None:
                out.append(moved)
        return out

    def control(self, task_id: str, action: ControlAction, at: float) -> StopOrder | None:
        """Cancel, pause or resume; the `farm.stop` to send, if any. Refused (TableError)
        when the state does not allow it."""
        self._settle()
        rec = self.get(task_id)
        state = rec.state
        try:
            if action is ControlAction.CANCEL:
                return self._cancel(rec, at)
            if action is ControlAction.PAUSE:
                return self._pause(rec, at)
            self._resume(rec, at)
            return None
        except InvalidTransition:
            raise TableError(f"task {task_id!r} is {state}: cannot {action}") from None

    def _cancel(self, rec: TaskRecord, at: float) -> StopOrder | None:
        if rec.state in TERMINAL:
            raise InvalidTransition("final")
        order = None
        if rec.state in _LIVE_ON_NODE and rec.node is not None:
            order = StopOrder(rec.node, rec.task_id, rec.fence, StopWhy.CANCEL)
        rec.node = None
        rec.stop = None
        rec.resume_after = False
        self._move(rec, TaskState.CANCELLED, Reason.CANCEL_REQUESTED, at)
        return order

    def _pause(self, rec: TaskRecord, at: float) -> StopOrder | None:
        if rec.state is TaskState.PAUSED:
            rec.resume_after = False
            return None
        if rec.state is TaskState.RUNNING and rec.node is not None:
            rec.stop = StopWhy.PAUSE  # paused once the node confirms (checkpoint, then stop)
            rec.resume_after = False
            self._touch(rec)
            return StopOrder(rec.node, rec.task_id, rec.fence, StopWhy.PAUSE)
        order = None
        if rec.state is TaskState.ASSIGNED and rec.node is not None:
            order = StopOrder(rec.node, rec.task_id, rec.fence, StopWhy.PAUSE)
        rec.node = None
        self._move(rec, TaskState.PAUSED, Reason.PAUSE_REQUESTED, at)
        return order

    def _resume(self, rec: TaskRecord, at: float) -> None:
        if rec.stop is StopWhy.PAUSE:
            rec.resume_after = True  # the pause finishes, then the task goes on
            self._touch(rec)
            return
        if rec.state is not TaskState.PAUSED:
            raise InvalidTransition("not paused")
        rec.not_before = at
        self._move(rec, TaskState.PENDING, Reason.RESUME_REQUESTED, at)


_MAX_LOSSES = RetryPolicy().max_losses
"""Node losses (and start failures) a task survives before it is dead-lettered."""


def _peek(data: bytes) -> tuple[str, int, int]:
    """An encoded record's (task id, revision, sequence); TableError when it is none."""
    try:
        d = msgpack.unpackb(data, raw=False)
    except (TypeError, ValueError) as e:
        raise TableError(f"bad task record: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict) or not d.keys() >= _FIELDS:
        raise TableError("bad task record: not a map of every field")
    task_id, rev, seq = d["id"], d["rev"], d["seq"]
    if not isinstance(task_id, str) or any(
        isinstance(v, bool) or not isinstance(v, int) for v in (rev, seq)
    ):
        raise TableError("bad task record: id, rev or seq of the wrong type")
    return task_id, rev, seq


def record_json(rec: TaskRecord, *, history: bool = False) -> dict[str, Any]:
    """What a client sees of a task (``TaskInfo.to_json()``)."""
    out: dict[str, Any] = {
        "id": rec.task_id,
        "state": str(rec.state),
        "node": rec.node,
        "attempt": rec.attempt,
        "progress": rec.progress,
        "target": rec.target,
        "priority": rec.priority,
        "needs": rec.needs.to_json(),
        "reason": str(rec.reason),
        "error": rec.error,
        "submitted": rec.life.history[0].wall_time,
        "updated": rec.life.history[-1].wall_time,
        "steps": rec.steps,
        "fence": rec.fence,
        "replicas": sorted(rec.replicas),
    }
    if rec.stop is not None:
        out["stopping"] = str(rec.stop)
    if history:
        out["history"] = [
            {
                "source": None if t.source is None else str(t.source),
                "target": str(t.target),
                "reason": str(t.reason),
                "at": t.at,
                "detail": t.detail,
                "wall_time": t.wall_time,
            }
            for t in rec.life.history
        ]
    return out
