"""The node agents' coordination messages (transport kinds ``agent.*``).

The coordinator (the lowest live rank that is not joining) drives every restart; nodes report
failures and progress to it. Every message that belongs to a recovery carries its W3C trace
context in the transport header, so the whole recovery is one trace.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from supervise.agents.selection import ByRank, Holdings, by_rank, pairs_of
from supervise.cluster.messages import message_kind
from supervise.snapshot.retention import VersionInfo
from supervise.telemetry import Source

# Heartbeat info keys (membership's small info map): what peers need to know of each other.
INFO_GENERATION = "gen"
INFO_STATE = "state"
#: In the reason a node refuses a prepare, restart or give_up with: the sender is not the
#: coordinator by that node's view (yet: the coordinator asks again while views converge).
NOT_COORDINATOR = "is not the coordinator"

#: One held shard version on the wire: ``(rank, step, generation, nbytes, metrics)`` (msgpack
#: maps take string keys only, so rank-keyed data travels as lists; `supervise status` reads
#: these too). Code handles `VersionInfo` by rank; only this module sees the tuples.
Entry = tuple[int, int, int, int, dict[str, float]]


def entries(held: ByRank) -> list[Entry]:
    """``held`` in its wire encoding."""
    return [(r, v.step, v.generation, v.nbytes, dict(v.metrics)) for r, v in pairs_of(held)]


def versions(wire: Iterable[Entry], source: Source) -> dict[int, tuple[VersionInfo, ...]]:
    """Wire entries back as versions by rank (wall time does not travel: 0.0)."""
    return by_rank(
        (rank, VersionInfo(step, generation, 0.0, nbytes, dict(metrics), source.value))
        for rank, step, generation, nbytes, metrics in wire
    )


def _holdings(node: int, ram: list[Entry], disk: list[Entry]) -> Holdings:
    """Wire entries back as versions by rank (RAM as local, disk as disk)."""
    return Holdings(node, versions(ram, Source.LOCAL), versions(disk, Source.DISK))


@message_kind("agent.failure")
@attrs.frozen(slots=True)
class Failure:
    """Node -> coordinator: something failed on ``node`` while running ``generation``.

    ``since`` is when the failure probably began (wall clock: the last good heartbeat of a hung
    worker, the exit of a crashed one); ``detected`` when the node noticed it.
    """

    node: int
    generation: int
    trigger: str  # a `Trigger` value
    since: float
    detected: float
    evidence: dict[str, Any] = attrs.field(factory=dict)


@message_kind("agent.prepare")
@attrs.frozen(slots=True)
class Prepare:
    """Coordinator -> node: stop your workers (a restart at ``generation`` is coming) and say
    what you hold."""

    generation: int


@message_kind("agent.holding")
@attrs.frozen(slots=True)
class Holding:
    """Node -> coordinator, reply to Prepare: shard versions in RAM and on disk (`Entry`)."""

    node: int
    ram: list[Entry]
    disk: list[Entry]
    port: int = 0  # the node hosting rank 0 offers a free rendezvous port

    @classmethod
    def of(cls, holdings: Holdings, port: int = 0) -> Holding:
        return cls(holdings.node, entries(holdings.ram), entries(holdings.disk), port)

    def holdings(self) -> Holdings:
        """What the node holds, as versions by rank."""
        return _holdings(self.node, self.ram, self.disk)


@message_kind("agent.restart")
@attrs.frozen(slots=True)
class Restart:
    """Coordinator -> node: start your workers at ``generation`` restored to ``step`` (`FRESH`:
    a fresh start), after fetching the shards listed in ``fetch`` (``(rank, source, node)``;
    msgpack maps take string keys only, so rank-keyed data travels as lists)."""

    generation: int
    step: int
    master_port: int
    attempt: int
    trigger: str  # a `Trigger` value, or `CLUSTER_START`
    fetch: list[tuple[int, str, int]] = attrs.field(factory=list)
    rewinds: list[tuple[int, int]] = attrs.field(factory=list)


@message_kind("agent.progress")
@attrs.frozen(slots=True)
class Progress:
    """Node -> coordinator: where the restart at ``generation`` stands on ``node``.

    ``phase`` is a `RestartProgress` (its value on the wire); ``detail`` says why a restart
    failed, ``bytes`` and ``source`` what the restore loaded and from where.
    """

    node: int
    generation: int
    phase: str
    detail: str = ""
    bytes: int = 0
    source: str = ""


@message_kind("agent.give_up")
@attrs.frozen(slots=True)
class GiveUp:
    """Coordinator -> node: recovery is exhausted (or the policy says stop): shut down."""

    reason: str
    exit_code: int


@message_kind("agent.finished")
@attrs.frozen(slots=True)
class Finished:
    """Node -> everyone: my workers completed training; my leaving is not a failure."""

    node: int
    generation: int


@message_kind("agent.recover")
@attrs.frozen(slots=True)
class Recover:
    """CLI -> any node: recover now at ``version`` (-1: by the policy's checkpoint rule)."""

    version: int = -1


@message_kind("agent.recover_reply")
@attrs.frozen(slots=True)
class RecoverReply:
    """Reply to Recover: whether the coordinator took the request, and why not."""

    accepted: bool
    detail: str


@message_kind("agent.status_query")
@attrs.frozen(slots=True)
class StatusQuery:
    """CLI -> any node: describe yourself."""


def _non_negative(_obj: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} = {value!r}: must be >= 0")


@attrs.frozen(slots=True)
class WorkerStatus:
    """One local rank's worker in a `Status`: its process and its progress.

    ``pid`` 0: no worker was started for the rank in this generation. ``spare``: the worker
    runs in a spare process (its command line is the spare's, not the training command's).
    ``last_step``: the last step the rank completed (None: none yet), ``step_age`` the seconds
    since (on the node's clock); ``running_for`` the seconds since this worker started.
    """

    rank: int = attrs.field(validator=attrs.validators.ge(0))
    pid: int = attrs.field(validator=attrs.validators.ge(0))
    spare: bool = False
    alive: bool = False
    last_step: int | None = None
    step_age: float | None = attrs.field(default=None, validator=_non_negative)
    running_for: float | None = attrs.field(default=None, validator=_non_negative)


@message_kind("agent.status")
@attrs.frozen(slots=True)
class Status:
    """Reply to StatusQuery: a node's view of itself and the cluster.

    ``workers``: one entry per local rank; ``spares``: the PIDs of spare processes waiting for
    the next restart; ``pid`` / ``guard``: the agent's PID and its process guard's (0: none),
    the other children of the agent a process listing shows.
    """

    node: int
    state: str
    generation: int
    coordinator: int
    live: list[int]
    ranks: list[int]
    ram: list[Entry]
    disk: list[Entry]
    workers: list[WorkerStatus] = attrs.field(factory=list)
    spares: list[int] = attrs.field(factory=list)
    pid: int = 0
    guard: int = 0
    detail: str = ""
    beats: list[dict[str, Any]] = attrs.field(factory=list)  # `monitor.Beat.to_wire`, by rank
    #: (rank, steps) for each of the node's ranks: how far its group peers' replicas trail its
    #: newest snapshot (the slowest peer; a peer holding nothing trails by the whole step)
    replica_lag: list[tuple[int, int]] = attrs.field(factory=list)
    #: the newest step known to be complete across the cluster (every rank's owner and group
    #: peers keep it until a newer one is); -1 while none is
    recoverable: int = -1

    def holdings(self) -> Holdings:
        """What the node holds, as versions by rank."""
        return _holdings(self.node, self.ram, self.disk)


@message_kind("agent.standby_hello")
@attrs.frozen(slots=True)
class StandbyHello:
    """Standby agent (a client) -> every node, each heartbeat interval: here I am, waiting.

    ``name``: the standby's identity (its endpoint); ``since``: its start (wall clock)."""

    name: str
    endpoint: str
    since: float
    ranks: list[int] | None = None  # the ranks it can take (None: any; CURVE: its node keys)


@message_kind("agent.standby_order")
@attrs.frozen(slots=True)
class StandbyOrder:
    """Reply to StandbyHello: ``rank`` to take over now (-1: keep waiting), and every node's
    endpoint as the coordinator knows them (the taken rank's: the standby's own); the
    standby greets ``coordinator`` more often (it alone hands out ranks)."""

    rank: int
    nodes: list[str] = attrs.field(factory=list)
    coordinator: int = -1  # the coordinator in the answering node's view (-1: unknown)


@message_kind("agent.rank_moved")
@attrs.frozen(slots=True)
class RankMoved:
    """Coordinator -> every live node: node ``rank`` is now served at ``endpoint`` (a standby
    took it over)."""

    rank: int
    endpoint: str


ALL_KINDS = (
    Failure,
    Prepare,
    Holding,
    Restart,
    Progress,
    GiveUp,
    Finished,
    Recover,
    RecoverReply,
    StatusQuery,
    Status,
    StandbyHello,
    StandbyOrder,
    RankMoved,
)
