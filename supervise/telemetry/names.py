"""Every telemetry name in one place: spans, events, attributes, metric instruments.

The span, event and attribute names are a public contract (DESIGN.md §4): dashboards, alerts
and tests outside the repository match on them, so change none; add freely.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

import attrs

#: Instrumentation scope of every span and instrument supervise emits.
SCOPE: Final = "supervise"
#: Default ``service.name`` (``OTEL_SERVICE_NAME`` overrides it).
SERVICE_NAME: Final = "supervise"

RECOVERY_SPAN: Final = "supervise.recovery"
#: One attempt of a resumable task (supervise.tasks): from its start to how it ended.
TASK_ATTEMPT_SPAN: Final = "supervise.task.attempt"
#: One step of a task attempt that ran (not one got back from the journal), with its commit.
TASK_STEP_SPAN: Final = "supervise.task.step"


class Phase(enum.StrEnum):
    """The child spans of one recovery, in the order they run."""

    DETECT = "detect"
    SELECT_CHECKPOINT = "select_checkpoint"
    FETCH = "fetch"  # only when shards come from peers or disk
    RESTORE = "restore"
    RESUME = "resume"  # ends at the first completed training step

    @property
    def span_name(self) -> str:
        """The contract span name, e.g. ``supervise.recovery.detect``."""
        return f"{RECOVERY_SPAN}.{self.value}"

    @property
    def order(self) -> int:
        """Position in the recovery (0 = detect)."""
        return _PHASE_ORDER[self]


_PHASE_ORDER: Final = {p: i for i, p in enumerate(Phase)}


class SnapshotOp(enum.StrEnum):
    """Snapshot data-plane operations that get their own span (``supervise.snapshot.<op>``)."""

    CAPTURE = "capture"
    REPLICATE = "replicate"
    PERSIST = "persist"

    @property
    def span_name(self) -> str:
        """The contract span name, e.g. ``supervise.snapshot.capture``."""
        return f"supervise.snapshot.{self.value}"


class Trigger(enum.StrEnum):
    """What started a recovery (``supervise.trigger``)."""

    WORKER_EXIT = "worker_exit"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    PEER_LOST = "peer_lost"
    NAN = "nan"
    CHECKSUM = "checksum"
    MANUAL = "manual"


class Source(enum.StrEnum):
    """Where a restored shard came from (``supervise.snapshot.source``)."""

    LOCAL = "local"
    PEER = "peer"
    DISK = "disk"


class Outcome(enum.StrEnum):
    """How a recovery ended: the root span's last event."""

    COMPLETED = "completed"
    FAILED = "failed"
    EXHAUSTED = "exhausted"


class RecoveryEvent(enum.StrEnum):
    """Span events on the root ``supervise.recovery`` span, in the order they happen."""

    DETECTED = "detected"
    STARTED = "started"
    CHECKPOINT_SELECTED = "checkpoint_selected"
    RESTORED = "restored"
    COMPLETED = "completed"
    FAILED = "failed"
    EXHAUSTED = "exhausted"


class Attr:
    """Attribute keys. The first block is the contract; the rest are supervise additions."""

    TRIGGER: Final = "supervise.trigger"
    NODE_RANK: Final = "supervise.node.rank"
    ATTEMPT: Final = "supervise.attempt"
    SNAPSHOT_VERSION: Final = "supervise.snapshot.version"
    SNAPSHOT_STEP: Final = "supervise.snapshot.step"
    SNAPSHOT_SOURCE: Final = "supervise.snapshot.source"
    BYTES: Final = "supervise.bytes"

    GENERATION: Final = "supervise.generation"
    PEER_RANK: Final = "supervise.peer.rank"
    WORLD_SIZE: Final = "supervise.world_size"
    PHASE: Final = "supervise.recovery.phase"
    OUTCOME: Final = "supervise.recovery.outcome"
    OPERATION: Final = "supervise.snapshot.operation"
    MEMORY_KIND: Final = "supervise.memory.kind"
    REASON: Final = "supervise.reason"
    RANK: Final = "supervise.rank"  # a training process's global rank (node.rank is its node)
    MESSAGE_KIND: Final = (
        "supervise.message.kind"  # a transport message kind, e.g. replica.push_ack
    )
    STORE_REVISION: Final = "supervise.store.revision"  # the store revision of the evidence
    STORE_LEASE: Final = "supervise.store.lease"  # a store lease id, in hex
    STORE_LEADER: Final = "supervise.store.leader"  # the elected coordinator's node rank
    TASK_ID: Final = "supervise.task.id"  # a resumable task's id
    TASK_TARGET: Final = "supervise.task.target"  # its MODULE:FUNC
    TASK_NODE: Final = "supervise.task.node"  # where an attempt runs (a name; ranks: node.rank)
    TASK_STEP: Final = "supervise.task.step_name"  # the step's name
    TASK_STATE: Final = "supervise.task.state"  # a task state (pending, running, completed...)
    TASK_OUTCOME: Final = "supervise.task.outcome"  # how an attempt ended (see docs/tasks.md)


#: Keyword shorthands accepted by the tracing helpers (``snapshot_version=3``).
SHORT_ATTRIBUTES: Final[dict[str, str]] = {
    "trigger": Attr.TRIGGER,
    "node_rank": Attr.NODE_RANK,
    "attempt": Attr.ATTEMPT,
    "snapshot_version": Attr.SNAPSHOT_VERSION,
    "snapshot_step": Attr.SNAPSHOT_STEP,
    "snapshot_source": Attr.SNAPSHOT_SOURCE,
    "bytes": Attr.BYTES,
    "generation": Attr.GENERATION,
    "peer_rank": Attr.PEER_RANK,
    "world_size": Attr.WORLD_SIZE,
    "reason": Attr.REASON,
    "rank": Attr.RANK,
    "store_revision": Attr.STORE_REVISION,
    "store_lease": Attr.STORE_LEASE,
    "store_leader": Attr.STORE_LEADER,
}

InstrumentKind = Literal["histogram", "counter", "observable_gauge"]


@attrs.frozen(slots=True)
class Instrument:
    """One metric instrument: its name, UCUM unit, kind and what it measures."""

    name: str
    unit: str
    kind: InstrumentKind
    description: str


#: Histogram buckets for durations in seconds: a memcpy restore (ms) to a disk reload (minutes).
DURATION_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
#: Histogram buckets for copy throughput in bytes/s: 10 MB/s (a slow disk) to 100 GB/s.
THROUGHPUT_BUCKETS: Final = (
    *(float(b) * 10.0**e for e in range(7, 11) for b in (1, 2.5, 5)),
    1e11,
)


class Metric:
    """Every metric instrument supervise records (names and units in one place)."""

    RECOVERY_DURATION: Final = Instrument(
        "supervise.recovery.duration",
        "s",
        "histogram",
        "Time from the start of a recovery to its outcome, per recovery.",
    )
    PHASE_DURATION: Final = Instrument(
        "supervise.recovery.phase.duration",
        "s",
        "histogram",
        "Time spent in one recovery phase (detect, select_checkpoint, fetch, restore, resume).",
    )
    RECOVERIES: Final = Instrument(
        "supervise.recovery.count",
        "{recovery}",
        "counter",
        "Recoveries that ended, by trigger and outcome.",
    )
    SNAPSHOT_DURATION: Final = Instrument(
        "supervise.snapshot.duration",
        "s",
        "histogram",
        "Time of one snapshot operation (capture, replicate, persist).",
    )
    SNAPSHOT_IO: Final = Instrument(
        "supervise.snapshot.io",
        "By",
        "counter",
        "Snapshot bytes moved, by operation: capture, replicate, persist, fetch, restore.",
    )
    SNAPSHOT_THROUGHPUT: Final = Instrument(
        "supervise.snapshot.throughput",
        "By/s",
        "histogram",
        "Bytes per second of one snapshot operation or recovery phase that moved data.",
    )
    TRAINING_STEPS: Final = Instrument(
        "supervise.training.steps",
        "{step}",
        "counter",
        "Completed training steps (heartbeats); its rate is the training throughput.",
    )
    MEMORY_HELD: Final = Instrument(
        "supervise.memory.held",
        "By",
        "observable_gauge",
        "Host memory held for snapshots, by kind (arena, replica), from registered sources.",
    )
    LATE_REPLIES: Final = Instrument(
        "supervise.transport.late_replies",
        "{reply}",
        "counter",
        "Replies that came after their request was given up, by message kind and reason"
        " (cancelled: e.g. a push cut short by its peer's loss or a shutdown; timed_out;"
        " unknown); each is dropped.",
    )
    REFUSED: Final = Instrument(
        "supervise.transport.refused",
        "{message}",
        "counter",
        "Messages and handshakes refused by authentication or authorization, by message kind"
        " (handshake: a connection without a known key) and reason; each is dropped.",
    )
    REPLICA_LAG: Final = Instrument(
        "supervise.replica.lag",
        "{step}",
        "observable_gauge",
        "Steps the group peers' replicas of a rank trail its newest local snapshot (the "
        "slowest peer), by rank, from registered sources.",
    )
    RECOVERIES_HELD: Final = Instrument(
        "supervise.store.recoveries_held",
        "{recovery}",
        "counter",
        "Recoveries a store-elected coordinator held back because fewer than a majority of the "
        "expected nodes held a live lease (the quorum guard), by trigger.",
    )

    TASK_STEP_DURATION: Final = Instrument(
        "supervise.task.step.duration",
        "s",
        "histogram",
        "Time of one task step that ran (not replayed from the journal), its commit included.",
    )
    TASKS_QUEUED: Final = Instrument(
        "supervise.tasks.queued",
        "{task}",
        "observable_gauge",
        "Tasks pending on the farm (the queue depth), from registered sources.",
    )
    TASKS_RUNNING: Final = Instrument(
        "supervise.tasks.running",
        "{task}",
        "observable_gauge",
        "Tasks running on the farm's nodes, from registered sources.",
    )
    TASKS_FINISHED: Final = Instrument(
        "supervise.tasks.finished",
        "{task}",
        "counter",
        "Tasks that ended, by supervise.task.state (completed, failed, cancelled).",
    )

    ALL: Final = (
        RECOVERY_DURATION,
        PHASE_DURATION,
        RECOVERIES,
        SNAPSHOT_DURATION,
        SNAPSHOT_IO,
        SNAPSHOT_THROUGHPUT,
        TRAINING_STEPS,
        MEMORY_HELD,
        LATE_REPLIES,
        REFUSED,
        REPLICA_LAG,
        RECOVERIES_HELD,
        TASK_STEP_DURATION,
        TASKS_QUEUED,
        TASKS_RUNNING,
        TASKS_FINISHED,
    )
