"""The farm's protocol (transport kinds ``farm.*``): coordinator <-> farm nodes, client <->
coordinator, and the coordinator's replicated task table.

Every message is a frozen attrs class validated at construction, so a malformed body is refused
by the transport's strict decoding before a handler sees it. A fence is strictly increasing per
task on every (re)assignment: anything carrying an older fence is a zombie's and is refused.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from supervise._validation import enum_value
from supervise.cluster.messages import message_kind

#: The largest task spec (``TaskSpec.to_bytes()``) a farm takes: it travels in `Assign`'s
#: header, which the transport bounds at 64 KiB.
MAX_SPEC_BYTES = 48 * 1024

#: An error text travels in `Update`'s header (and in the table's history): cut to this many
#: characters (an exception message can be any size).
MAX_ERROR_CHARS = 2000

#: The reason in an `Ack` refusing an update or commit from an attempt that is not the task's
#: current one (its node was presumed lost and the task moved): kill it, drop its writes.
STALE_FENCE = "stale fence"


def _ge0(_inst: object, attr: attrs.Attribute[Any], value: float | int) -> None:
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"{attr.name} = {value!r}: must be >= 0")


#: The longest a coordinator holds a `ResultQuery` for a task to end.
RESULT_HOLD_MAX_S = 5.0


def _hold(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.0 <= value <= RESULT_HOLD_MAX_S
    ):
        raise ValueError(f"{attr.name} = {value!r}: must be in [0, {RESULT_HOLD_MAX_S:g}] seconds")


def _non_empty(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attr.name} = {value!r}: must be a non-empty string")


def _fraction(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} = {value!r}: must be in [0, 1]")


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} = {value!r}: must be > 0")


class AttemptPhase(enum.StrEnum):
    """Where an attempt stands, as its node reports it in an `Update`."""

    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    ERRORED = "errored"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    START_FAILED = "start_failed"


class StopWhy(enum.StrEnum):
    """Why the coordinator stops an attempt."""

    PAUSE = "pause"  # checkpoint, then stop; the task resumes later from its journal
    CANCEL = "cancel"  # stop for good


class ControlAction(enum.StrEnum):
    """What a client asks of a task."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"


def _phase(value: object) -> AttemptPhase:
    return enum_value(AttemptPhase, "phase", value)


def _why(value: object) -> StopWhy:
    return enum_value(StopWhy, "why", value)


def _action(value: object) -> ControlAction:
    return enum_value(ControlAction, "action", value)


@message_kind("farm.ack")
@attrs.frozen(slots=True)
class Ack:
    """The plain reply: done (``ok``), or refused and why (``STALE_FENCE`` for a zombie)."""

    ok: bool
    reason: str = ""


# --------------------------------------------------------------- coordinator <-> farm node


@message_kind("farm.offer")
@attrs.frozen(slots=True)
class Offer:
    """Node -> coordinator, at start and whenever it changes: what the node can run
    (``capacity`` is ``Resources.to_json()``) and its ``k=v`` labels. Reply: `Ack`."""

    node: int = attrs.field(validator=_ge0)
    capacity: dict[str, Any]
    labels: list[str] = attrs.field(factory=list)


@message_kind("farm.assign")
@attrs.frozen(slots=True)
class Assign:
    """Coordinator -> node: run attempt ``attempt`` of a task under ``fence`` (strictly
    increasing per task on every (re)assignment), as a lease of ``lease_s`` seconds renewed by
    `Renew`. ``spec`` is ``TaskSpec.to_bytes()``, ``needs`` ``Resources.to_json()``;
    ``fetch_from`` the ranks believed to hold the task's journal replica ([] = fresh start).
    The W3C trace context of a recovery travels in the transport header. Reply: `Ack`."""

    task_id: str = attrs.field(validator=_non_empty)
    attempt: int = attrs.field(validator=_ge0)
    fence: int = attrs.field(validator=_ge0)
    spec: bytes
    needs: dict[str, Any]
    lease_s: float = attrs.field(validator=_positive)
    fetch_from: list[int] = attrs.field(factory=list)


@message_kind("farm.update")
@attrs.frozen(slots=True)
class Update:
    """Node -> coordinator: an attempt's phase and progress. ``error``/``error_mro`` come with
    ERRORED (for ``RetryPolicy.verdict``), ``result`` (the encoded return value) with COMPLETED,
    ``replicas`` the ranks now holding the task's journal. Reply: `Ack`; ``Ack(False,
    STALE_FENCE)`` says the attempt is a zombie: kill it and drop its journal writes."""

    node: int = attrs.field(validator=_ge0)
    task_id: str = attrs.field(validator=_non_empty)
    attempt: int = attrs.field(validator=_ge0)
    fence: int = attrs.field(validator=_ge0)
    phase: AttemptPhase = attrs.field(converter=_phase)
    progress: float = attrs.field(default=0.0, validator=_fraction)
    steps: int = attrs.field(default=0, validator=_ge0)
    error: str | None = None
    error_mro: list[str] = attrs.field(factory=list)
    result: bytes | None = None
    replicas: list[int] = attrs.field(factory=list)


@message_kind("farm.renew")
@attrs.frozen(slots=True)
class Renew:
    """Node -> coordinator every ``lease_s / 3``, also when it runs nothing (its sign of
    life): the attempts it runs, ``(task_id, fence)``; a long list comes as payload frame 0
    (a packed list of pairs) instead. Reply: `Renewed`."""

    node: int = attrs.field(validator=_ge0)
    held: list[tuple[str, int]] = attrs.field(factory=list)
    #: attempts ``(task_id, fence)`` the node ended without a report (its commits refused):
    #: the coordinator moves them at once rather than when their lease runs out
    dropped: list[tuple[str, int]] = attrs.field(factory=list)


@message_kind("farm.renewed")
@attrs.frozen(slots=True)
class Renewed:
    """Reply to `Renew`: the held attempts (task ids) that are zombies — kill them; the others'
    leases are renewed. ``ok`` False with ``reason``: the receiver is not the coordinator."""

    stale: list[str] = attrs.field(factory=list)
    ok: bool = True
    reason: str = ""


@message_kind("farm.stop")
@attrs.frozen(slots=True)
class Stop:
    """Coordinator -> node: pause (checkpoint then stop) or cancel the attempt under ``fence``.
    Reply: `Ack`; the node then reports PAUSED or CANCELLED in an `Update`."""

    task_id: str = attrs.field(validator=_non_empty)
    fence: int = attrs.field(validator=_ge0)
    why: StopWhy = attrs.field(converter=_why)


# --------------------------------------------------------------- client <-> coordinator


@message_kind("farm.refusal")
@attrs.frozen(slots=True)
class FarmRefusal:
    """Any client request's refusal: ``reason`` (one line); ``coordinator`` is the rank to ask
    instead when the receiver is not the coordinator (None: not known yet, ask again)."""

    reason: str
    coordinator: int | None = None
    unschedulable: bool = False  # the task's resources fit no node, ever
    unknown: bool = False  # no task with this id


@message_kind("farm.submit")
@attrs.frozen(slots=True)
class Submit:
    """Client -> coordinator: queue a task (``spec`` is ``TaskSpec.to_bytes()``). Idempotent by
    task id: a second submit of the same id answers the existing task. Reply: `TaskReply`."""

    spec: bytes
    needs: dict[str, Any]
    labels: list[str] = attrs.field(factory=list)
    priority: int = 0
    max_attempts: int = attrs.field(default=3, validator=_positive)
    non_retryable: list[str] = attrs.field(factory=list)  # exception types, ``module.QualName``


@message_kind("farm.query")
@attrs.frozen(slots=True)
class Query:
    """Client -> coordinator: one task (``task_id``) or all (None). Reply: `TaskList`."""

    task_id: str | None = None
    history: bool = False


@message_kind("farm.control")
@attrs.frozen(slots=True)
class Control:
    """Client -> coordinator: cancel, pause or resume a task. Reply: `TaskReply`."""

    task_id: str = attrs.field(validator=_non_empty)
    action: ControlAction = attrs.field(converter=_action)


@message_kind("farm.result")
@attrs.frozen(slots=True)
class ResultQuery:
    """Client -> coordinator: a task's outcome. Reply: `ResultReply`. With ``wait`` > 0 the
    coordinator holds the query of an unfinished task until it ends (answered once its end
    is saved) or ``wait`` seconds pass (at most `RESULT_HOLD_MAX_S`; then its state now)."""

    task_id: str = attrs.field(validator=_non_empty)
    wait: float = attrs.field(default=0.0, validator=_hold)


@message_kind("farm.task")
@attrs.frozen(slots=True)
class TaskReply:
    """One task as the client sees it (``TaskInfo.to_json()`` with its history)."""

    info: dict[str, Any]


@message_kind("farm.tasks")
@attrs.frozen(slots=True)
class TaskList:
    """Tasks as the client sees them (``TaskInfo.to_json()`` each)."""

    tasks: list[dict[str, Any]] = attrs.field(factory=list)


@message_kind("farm.outcome")
@attrs.frozen(slots=True)
class ResultReply:
    """Reply to `ResultQuery`: the task's state; ``result`` (encoded return value) when
    completed, ``error`` when failed or cancelled."""

    task_id: str
    state: str
    result: bytes | None = None
    error: str | None = None


# --------------------------------------------------------------- the replicated task table


@message_kind("farm.table")
@attrs.frozen(slots=True)
class TableUpdate:
    """Coordinator -> every farm node (no store): task records that changed, each the encoded
    record with its own revision (in ``records`` when few, else as payload frames, each a
    packed list: the header is bounded at 64 KiB); a receiver keeps the highest revision of
    each task so a new coordinator takes the queue over with nothing lost or duplicated.
    ``offers``: the nodes' offers ``(rank, capacity, labels)`` the coordinator knows, when they
    changed. Reply: `Ack`."""

    coordinator: int = attrs.field(validator=_ge0)
    records: list[bytes] = attrs.field(factory=list)
    offers: list[tuple[int, dict[str, Any], list[str]]] = attrs.field(factory=list)
    more: bool = False  # a `TablePull` page: more records follow it (ask from the last)


@message_kind("farm.table_pull")
@attrs.frozen(slots=True)
class TablePull:
    """New coordinator -> farm node: send the task records you hold, in submission order, those
    after ``(after, after_id)`` (seq, task id), at most ``limit`` (0: all). Reply: `TableUpdate`
    (its ``more`` set when records are left: the table is pulled in bounded pages)."""

    coordinator: int = attrs.field(validator=_ge0)
    after: int = attrs.field(default=0, validator=_ge0)
    after_id: str = ""
    limit: int = attrs.field(default=0, validator=_ge0)


#: Every farm kind, for a transport's registry.
KINDS: tuple[type[Any], ...] = (
    Ack,
    Offer,
    Assign,
    Update,
    Renew,
    Renewed,
    Stop,
    FarmRefusal,
    Submit,
    Query,
    Control,
    ResultQuery,
    TaskReply,
    TaskList,
    ResultReply,
    TableUpdate,
    TablePull,
)
