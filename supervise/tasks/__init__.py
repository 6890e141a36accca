"""Resumable tasks: multi-step jobs whose finished steps are committed once and never re-run.

A task is an async function taking a `TaskContext`; each ``await ctx.step(name, fn, ...)``
commits its result before it counts as done, so a resumed attempt (after a crash, a kill -9,
an error) gets it back instead of running the step again. A farm of ``supervise node
--tasks`` agents schedules them by resources and moves them off lost nodes (`Farm`, the
client). Torch-free.
"""

from supervise.tasks.arena_journal import ArenaJournal
from supervise.tasks.attempt import BadTarget
from supervise.tasks.context import StepError, TaskContext, idempotency_key
from supervise.tasks.farm import Farm, FarmError, TaskCancelled, TaskInfo, TaskRef, Unschedulable
from supervise.tasks.host import JournalHost, open_journal_host
from supervise.tasks.journal import (
    CorruptRecord,
    DiskJournal,
    Journal,
    JournalView,
    MemoryJournal,
    Outcome,
)
from supervise.tasks.policy import (
    AtMilestones,
    Automatic,
    Checkpoint,
    CheckpointMode,
    EverySeconds,
    EveryStep,
    Manual,
    RetryPolicy,
    TaskPolicy,
)
from supervise.tasks.resources import Resources, machine_capacity, parse_labels, parse_size
from supervise.tasks.runner import (
    AttemptEnd,
    InProcess,
    JournalKind,
    Launcher,
    TaskFailed,
    TaskResult,
    TaskRunner,
    WorkerProcess,
    run_local,
    unwrap,
)
from supervise.tasks.scheduler import Strategy
from supervise.tasks.spec import TaskSpec
from supervise.tasks.states import (
    ALLOWED,
    TERMINAL,
    InvalidTransition,
    Lifecycle,
    Reason,
    TaskState,
    Transition,
)
from supervise.tasks.values import CorruptValue, UnsupportedValue, decode, encode

__all__ = [
    "ALLOWED",
    "TERMINAL",
    "ArenaJournal",
    "AtMilestones",
    "AttemptEnd",
    "Automatic",
    "BadTarget",
    "Checkpoint",
    "CheckpointMode",
    "CorruptRecord",
    "CorruptValue",
    "DiskJournal",
    "EverySeconds",
    "EveryStep",
    "Farm",
    "FarmError",
    "InProcess",
    "InvalidTransition",
    "Journal",
    "JournalHost",
    "JournalKind",
    "JournalView",
    "Launcher",
    "Lifecycle",
    "Manual",
    "MemoryJournal",
    "Outcome",
    "Reason",
    "Resources",
    "RetryPolicy",
    "StepError",
    "Strategy",
    "TaskCancelled",
    "TaskContext",
    "TaskFailed",
    "TaskInfo",
    "TaskPolicy",
    "TaskRef",
    "TaskResult",
    "TaskRunner",
    "TaskSpec",
    "TaskState",
    "Transition",
    "Unschedulable",
    "UnsupportedValue",
    "WorkerProcess",
    "decode",
    "encode",
    "idempotency_key",
    "machine_capacity",
    "open_journal_host",
    "parse_labels",
    "parse_size",
    "run_local",
    "unwrap",
]
