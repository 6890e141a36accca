"""The node's seat in a store-coordinated job (``--store etcd://...``): a membership key held
by the node's lease, a campaign for the coordinator's seat, and the coordinator's decisions
written fenced on its leadership, so a deposed coordinator (frozen, cut off) changes nothing.

Keys under ``/supervise/<job>/``: ``members/<rank>`` (leased), ``leader`` (the elected
coordinator's rank, leased), ``attempt`` (a (re)start begun) and ``decision`` (the restart
decided), both written fenced.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs
import structlog
import trio

from supervise.agents.config import NodeConfig
from supervise.runtime import Backoff
from supervise.store import (
    Election,
    EventKind,
    FencedWriteRefused,
    Follow,
    Leadership,
    LeaseLost,
    Put,
    Record,
    Resync,
    Store,
    StoreUnavailable,
    keep_alive,
    open_store,
)

log = structlog.get_logger("supervise.agents.seat")

MEMBERS: Final = "members/"
LEADER: Final = "leader"
DECISION: Final = "decision"
ATTEMPT: Final = "attempt"
_RETRY: Final = Backoff(initial=0.5, max=10.0, multiplier=2.0)


class SeatEvent(enum.StrEnum):
    """What happened to the seat: span events on an open recovery (see `SeatNews`)."""

    ELECTION_WON = "store_election_won"
    ELECTION_LOST = "store_election_lost"  # another node leads
    LEASE_LOST = "store_lease_lost"
    LEASE_REGAINED = "store_lease_regained"
    FENCED_WRITE_REFUSED = "store_fenced_write_refused"


@attrs.frozen(slots=True)
class SeatNews:
    """One `SeatEvent` with its evidence: the store revision it was seen at (0: unknown),
    the lease concerned (0: none) and the leader's rank (None: unknown)."""

    event: SeatEvent
    revision: int = 0
    lease: int = 0
    leader: int | None = None


#: Told each `SeatNews` as it happens (the coordinator: a span event on its open recovery).
SeatObserver = Callable[[SeatNews], None]


class StoreSeat:
    """This node's lease, membership key and campaign; the leader it knows of; fenced
    decisions. ``run`` is a supervised child: a lost lease ends it abnormally (restarted:
    a fresh lease, registered and campaigning again)."""

    def __init__(self, config: NodeConfig, *, connect: Callable[[], Store] | None = None) -> None:
        self.config = config
        self._connect = connect or (lambda: open_store(config.store))  # tests share one store
        self.rank = config.rank
        self.prefix = config.store.prefix
        self.ttl = max(1, math.ceil(config.policy.cluster.peer_timeout))
        self._leader: int | None = None
        self._members: frozenset[int] = frozenset()  # ranks with a live lease, as last read
        self._leadership: Leadership | None = None
        self._election: Election | None = None
        self._lost_lease = 0  # the last lease lost, until a fresh one is registered
        self.observer: SeatObserver | None = None

    def leader_rank(self) -> int | None:
        """The elected coordinator's rank as last seen in the store (None: none known)."""
        return self._leader

    def members(self) -> frozenset[int]:
        """The ranks whose membership key (held by a live lease) the store last showed; empty
        while the store is unreachable (nothing is known then)."""
        return self._members

    def quorum(self, expected: Sequence[int]) -> bool:
        """Whether a majority of the ``expected`` nodes hold a live lease (the quorum guard:
        no recovery starts without one)."""
        alive = len(self._members & set(expected))
        return alive >= len(expected) // 2 + 1

    def leads(self) -> bool:
        """Whether this node holds the coordinator's seat."""
        return self._leadership is not None

    async def decide(
        self, *, generation: int, step: int, port: int, attempt: int, nodes: Sequence[int]
    ) -> int:
        """Write a restart decision fenced on this node's leadership; the store revision.

        Raises `FencedWriteRefused` when the seat was lost meanwhile (act on nothing then),
        `StoreUnavailable` when the store does not answer, and `LookupError` when this node
        does not lead.
        """
        decision = {
            "generation": generation,
            "step": step,
            "port": port,
            "attempt": attempt,
            "nodes": list(nodes),
        }
        revision = await self._fenced(DECISION, decision)
        log.info("decision written", generation=generation, step=step, revision=revision)
        return revision

    async def _fenced(self, key: str, record: dict[str, object]) -> int:
        leadership, election = self._leadership, self._election
        if leadership is None or election is None:
            raise LookupError(f"node {self.rank} does not hold the coordinator's seat")
        body = {**record, "leader": self.rank, "term": leadership.revision}
        encoded = json.dumps(body, sort_keys=True).encode()
        try:
            result = await election.write(leadership, (Put(self.prefix + key, encoded),))
        except FencedWriteRefused:
            self._tell(
                SeatNews(SeatEvent.FENCED_WRITE_REFUSED, leadership.revision, leadership.lease)
            )
            raise
        return result.revision

    async def write_fenced(self, puts: Sequence[tuple[str, bytes]]) -> int:
        """Write raw values (keys under the job's prefix) fenced on this node's leadership,
        in one transaction (the farm's task table); the store revision. Same errors as
        `decide`."""
        leadership, election = self._leadership, self._election
        if leadership is None or election is None:
            raise LookupError(f"node {self.rank} does not hold the coordinator's seat")
        ops = tuple(Put(self.prefix + key, value) for key, value in puts)
        try:
            result = await election.write(leadership, ops)
        except FencedWriteRefused:
            self._tell(
                SeatNews(SeatEvent.FENCED_WRITE_REFUSED, leadership.revision, leadership.lease)
            )
            raise
        return result.revision

    async def read_prefix(self, prefix: str) -> list[bytes]:
        """Every value under the job's ``prefix`` (the farm's task table)."""
        election = self._election
        if election is None:
            raise LookupError(f"node {self.rank} is not connected to the store")
        snapshot = await election.store.range(self.prefix + prefix, prefix=True)
        return [r.value for r in snapshot.records]

    async def claim(self, *, generation: int, attempt: int, trigger: str) -> int:
        """Write "this leader is starting generation ``generation``" fenced on its
        leadership, before it stops or tells any node anything; the store revision.

        Same errors as `decide`: a coordinator that lost its seat (it froze, or was cut off,
        for longer than its lease) learns it here, before it has acted on anything.
        """
        intent = {"generation": generation, "attempt": attempt, "trigger": trigger}
        return await self._fenced(ATTEMPT, intent)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the seat until cancelled; `LeaseLost` (loud) when the lease is lost."""
        store = self._connect()
        lease = 0
        # started at once: while the store is unreachable the seat waits in the background,
        # never holding up the node's tree (training goes on without a coordinator)
        task_status.started()
        try:
            lease = await self._register(store)
            election = Election(store, self.prefix + LEADER)
            self._election = election
            async with trio.open_nursery() as nursery:
                await nursery.start(keep_alive, store, lease, self.ttl)
                nursery.start_soon(self._follow_leader, store)
                nursery.start_soon(self._follow_members, store)
                self._leadership = await self._campaign(election, lease)
                log.info(
                    "elected coordinator",
                    term=self._leadership.revision,
                    lease=f"{lease:x}",
                    ttl=self.ttl,
                )
                self._tell(
                    SeatNews(SeatEvent.ELECTION_WON, self._leadership.revision, lease, self.rank)
                )
        except* LeaseLost:  # logged loudly by keep_alive; a span event where one is open
            self._lost_lease = lease
            self._tell(SeatNews(SeatEvent.LEASE_LOST, lease=lease, leader=self._leader))
            raise
        finally:
            self._leadership, self._leader, self._election = None, None, None
            self._members = frozenset()
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                if lease:
                    with contextlib.suppress(StoreUnavailable):
                        await store.revoke(lease)  # leave at once rather than after a TTL
                await store.aclose()

    def _tell(self, news: SeatNews) -> None:
        if self.observer is not None:
            self.observer(news)

    async def _register(self, store: Store) -> int:
        """A fresh lease and this node's membership key on it, retried with backoff while
        the store is unreachable (said once)."""
        attempt = 0
        member = json.dumps({"endpoint": self.config.endpoint, "rank": self.rank}).encode()
        while True:
            try:
                lease = await store.grant(self.ttl)
                await store.put(self.prefix + MEMBERS + str(self.rank), member, lease=lease)
            except StoreUnavailable as exc:
                attempt += 1
                if attempt == 1:
                    log.warning("store unreachable; retrying", error=str(exc))
                await trio.sleep(_RETRY.delay(attempt))
                continue
            log.info("joined the store", lease=f"{lease:x}", prefix=self.prefix)
            if self._lost_lease:
                log.info("store lease regained", lease=f"{lease:x}", lost=f"{self._lost_lease:x}")
                self._lost_lease = 0
                self._tell(SeatNews(SeatEvent.LEASE_REGAINED, lease=lease))
            return lease

    async def _campaign(self, election: Election, lease: int) -> Leadership:
        """Campaign until elected; an unreachable store pauses the campaign (the lease's
        keep-alive decides, after a TTL, whether the seat is lost)."""
        paused = False
        while True:
            try:
                return await election.campaign(lease, str(self.rank).encode())
            except StoreUnavailable as exc:
                if not paused:
                    log.info("campaign paused: store unreachable", error=str(exc))
                    paused = True
                await trio.sleep(_RETRY.initial)

    async def _follow_leader(self, store: Store) -> None:
        """Keep ``leader_rank`` current from the leader key's changes."""
        key = self.prefix + LEADER
        while True:
            try:
                snapshot = await store.range(key)
                self._saw_leader(snapshot.records[0] if snapshot.records else None)
                async with Follow(
                    store, key, prefix=False, start_revision=snapshot.revision + 1
                ) as changes:
                    async for change in changes:
                        if isinstance(change, Resync):
                            records = change.snapshot.records
                            self._saw_leader(records[0] if records else None)
                            continue
                        last = change[-1]
                        gone = last.kind is EventKind.DELETE
                        self._saw_leader(None if gone else last.record)
            except StoreUnavailable as exc:
                log.warning("store unreachable; leader unknown", error=str(exc))
                self._leader = None
                await trio.sleep(_RETRY.max / 4)

    def _saw_leader(self, record: Record | None) -> None:
        """The leader key as read: another node's term is an election this node lost."""
        before, self._leader = self._leader, _rank(record)
        if record is None or self._leader in (None, before, self.rank):
            return
        log.info(
            "following the elected coordinator",
            leader=self._leader,
            term=record.create_revision,
            lease=f"{record.lease:x}",
        )
        self._tell(
            SeatNews(SeatEvent.ELECTION_LOST, record.create_revision, record.lease, self._leader)
        )

    async def _follow_members(self, store: Store) -> None:
        """Keep ``members`` current from the membership keys' changes (live leases)."""
        prefix = self.prefix + MEMBERS
        while True:
            try:
                snapshot = await store.range(prefix, prefix=True)
                self._members = _ranks(snapshot.records)
                async with Follow(
                    store, prefix, prefix=True, start_revision=snapshot.revision + 1
                ) as changes:
                    async for change in changes:
                        if isinstance(change, Resync):
                            self._members = _ranks(change.snapshot.records)
                            continue
                        ranks = set(self._members)
                        for event in change:
                            if event.kind is EventKind.DELETE:
                                ranks -= _ranks((event.record,))
                            else:
                                ranks |= _ranks((event.record,))
                        self._members = frozenset(ranks)
            except StoreUnavailable:
                self._members = frozenset()  # unknown: no quorum can be shown
                await trio.sleep(_RETRY.max / 4)


def _ranks(records: Iterable[Record]) -> frozenset[int]:
    """The ranks membership keys name (their last path part)."""
    out = set()
    for record in records:
        tail = record.key.rsplit("/", 1)[-1]
        if tail.isdigit():
            out.add(int(tail))
    return frozenset(out)


def _rank(record: Record | None) -> int | None:
    if record is None:
        return None
    try:
        return int(record.value)
    except ValueError:
        return None
