"""The farm's control plane: the task table served by the coordinator, on every farm node.

Every farm node runs a `FarmControl`; the one that ``leader()`` names (the lowest live rank, or
the elected leader with ``--store``) is the coordinator: it takes client requests, places
pending tasks on the nodes' offers (`scheduler.place`), hands them out as leases
(`farm.assign`), renews them (`farm.renew`), takes the nodes' reports (`farm.update`, a stale
fence refused: the zombie is told) and requeues the tasks of a node lost by membership or
whose lease ran out. A lease run out is a loss only when its node gave no sign of life for a
lease (a node that says, in a renewal, it dropped an attempt has it moved at once): a live
node merely slow to renew keeps its tasks. An assignment's lease starts again when the node
acknowledges it. Leases run on the `_awake` clock, which stops while the coordinator's own
process cannot run (the renewals then wait unread). The others answer clients with a
redirect and keep a replica of the table.

Durability first: every change is saved (to the store, fenced, with ``durable``; else to every
live farm node as `TableUpdate`, at least one of them acknowledging) before anything acting on
it is sent — a reply, an
assignment — so a new coordinator (which pulls the replicas and keeps each task's highest
revision) loses and duplicates nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
import msgpack
import structlog
import trio

from supervise.cluster.errors import ClusterError
from supervise.cluster.transport import DEFERRED, Incoming, Reply
from supervise.tasks.farm_link import FarmLink
from supervise.tasks.farm_messages import (
    MAX_SPEC_BYTES,
    STALE_FENCE,
    Ack,
    Assign,
    AttemptPhase,
    Control,
    FarmRefusal,
    Offer,
    Query,
    Renew,
    Renewed,
    ResultQuery,
    ResultReply,
    Stop,
    Submit,
    TablePull,
    TableUpdate,
    TaskList,
    TaskReply,
    Update,
)
from supervise.tasks.journal import CorruptRecord
from supervise.tasks.resources import MILLI, Resources
from supervise.tasks.scheduler import NodeView, Request, Strategy, place, unschedulable
from supervise.tasks.spec import TaskSpec
from supervise.tasks.states import TERMINAL, TaskState
from supervise.tasks.table import (
    StopOrder,
    TableError,
    TaskRecord,
    TaskTable,
    UnknownTask,
    UpdateVerdict,
    record_json,
)
from supervise.tasks.telemetry import FarmMetrics
from supervise.telemetry import (
    Outcome,
    Phase,
    RecoveryEvent,
    RecoveryTrace,
    TelemetryError,
    Trigger,
)

log = structlog.get_logger("supervise.tasks.control")

#: The reason a farm node that is not the coordinator gives a node's report (`Ack`/`Renewed`).
NOT_COORDINATOR = "not the coordinator"
#: Fences are ``k * FENCE_STRIDE + coordinator rank``: two coordinators that briefly both
#: believe they lead (views converging) never hand out the same fence.
FENCE_STRIDE = 1 << 16
TASK_ID_ATTR = "supervise.task.id"
#: Values up to this size travel in a reply's header (64 KiB at most); larger, as its payload.
INLINE_BYTES = 16 * 1024
#: Records per `TableUpdate` push and per `TablePull` page: however long the table, every
#: request of a save or a takeover stays small and quick to answer.
TABLE_CHUNK = 500
#: Table pushes to one peer at a time at most: past that a slow peer skips a save (the
#: others hold it; a new coordinator pulls from every live peer and merges by revision).
MAX_PUSHES_IN_FLIGHT = 8
#: The most bytes packed into one payload frame (the transport refuses frames over 64 MiB).
FRAME_BYTES = 8 << 20
#: A lease run out on a node that still shows signs of life (its messages arrive, its renewal
#: of that task is late) is waited on up to this many more leases before the task moves.
LAPSE_LIMIT = 10
#: How often the coordinator checks that its own process runs on time (see `_awake`).
WATCH_S = 0.25
#: Pending tasks offered to the scheduler per round, highest priority and oldest first (a
#: round places at most what is free; the next round, at once after any change, goes on).
PLACE_WINDOW = 128

_QUIET_PHASES = frozenset({AttemptPhase.STARTED, AttemptPhase.PROGRESS})


class Durable(Protocol):
    """Where the table lives with ``--store``: fenced by the leader's election revision."""

    async def save(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Write these records (task id, encoded); raises if this node no longer leads."""

    async def load(self) -> list[bytes]:
        """Every record saved."""


@attrs.frozen(slots=True)
class _Offer:
    capacity: Resources
    labels: frozenset[str]


class FarmControl:
    """The task table and the coordinator's loop on one farm node (see the module doc)."""

    def __init__(
        self,
        link: FarmLink,
        *,
        leader: Callable[[], int | None],
        live: Callable[[], Iterable[int]],
        lease_s: float = 10.0,
        strategy: Strategy = Strategy.PACK,
        durable: Durable | None = None,
        clock: Callable[[], float] = time.time,
        metrics: FarmMetrics | None = None,
        request_timeout: float = 5.0,
        tick: float = 0.5,
        changes: Callable[[], trio.MemoryReceiveChannel[Any]] | None = None,
    ) -> None:
        rank = link.rank
        if rank is None:
            raise ValueError("a farm node's link needs a rank")
        self.rank = rank
        self.link = link
        self.table = TaskTable()
        self._leader = leader
        self._live = live
        self.lease_s = lease_s
        self.strategy = strategy
        self._durable = durable
        self._clock = clock
        self.metrics = metrics if metrics is not None else FarmMetrics()
        self._timeout = request_timeout
        self._in_flight: dict[int, int] = {}  # table pushes under way, per peer
        self._tick = min(tick, lease_s / 4)
        self.offers: dict[int, _Offer] = {}
        self._offers_dirty = False
        self._leases: dict[str, float] = {}
        self._leading = False
        self._wake = trio.Event()
        self._replies: list[tuple[Incoming[Any], object]] = []
        self._orders: list[tuple[int, object, Mapping[str, str]]] = []
        self._recoveries: dict[str, RecoveryTrace] = {}
        self._nursery: trio.Nursery | None = None
        self._changes = changes  # membership's events: a lost node is handled at once
        self._stalled = False  # this process slept far longer than it asked (SIGSTOP)
        # leases: a node's latest message (its sign of life), on the `_awake` clock
        self._heard: dict[int, float] = {}
        self._disowned: set[str] = set()  # its node said it dropped the attempt
        self._deaf = 0.0  # seconds this process could not run its tasks (starved, stopped)
        self._due: float | None = None  # when the watchdog is due to wake
        # result queries held until their task ends: task id -> [(query, deadline on trio's
        # clock)]; answered after the save that holds the end (see `_answer_held`)
        self._held: dict[str, list[tuple[Incoming[ResultQuery], float]]] = {}

    # -- who leads -------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this node acts as the coordinator now."""
        return self._leading

    def coordinator(self) -> int | None:
        return self._leader()

    def _refusal(self) -> FarmRefusal:
        who = self._leader()
        if who == self.rank:  # taking over: not ready yet, ask again
            return FarmRefusal(f"rank {self.rank} is taking the farm over; ask again", None)
        return FarmRefusal(f"rank {self.rank} is {NOT_COORDINATOR} (ask rank {who})", who)

    def _leads_now(self) -> bool:
        return self._leading and self._leader() == self.rank

    # -- running ---------------------------------------------------------------------------

    def install(self) -> None:
        """Register the coordinator-side handlers on the link."""
        link = self.link
        link.handle(Offer, self._on_offer)
        link.handle(Renew, self._on_renew)
        link.handle(Update, self._on_update)
        link.handle(Submit, self._on_submit)
        link.handle(Query, self._on_query)
        link.handle(Control, self._on_control)
        link.handle(ResultQuery, self._on_result)
        link.handle(TableUpdate, self._on_table)
        link.handle(TablePull, self._on_pull)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled: lead while ``leader()`` names this node, else follow."""
        self.install()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._changes is not None:
                nursery.start_soon(self._watch, self._changes())
            nursery.start_soon(self._watchdog)
            task_status.started()
            try:
                while True:
                    await self.step()
                    await self._sleep()
            finally:
                self._nursery = None
                for recovery in self._recoveries.values():
                    recovery.end(Outcome.FAILED, reason="the coordinator stopped")
                self._recoveries.clear()

    async def _watch(self, changes: trio.MemoryReceiveChannel[Any]) -> None:
        async with changes:
            async for _ in changes:
                self.poke()

    async def _watchdog(self) -> None:
        """Count the time this process could not run its tasks (a starved CPU, a long
        synchronous stretch, SIGSTOP): the nodes' renewals waited unread meanwhile."""
        while True:
            self._due = trio.current_time() + WATCH_S
            await trio.sleep(WATCH_S)
            self._deaf += max(0.0, trio.current_time() - self._due)
            self._due = None

    def _awake(self) -> float:
        """The clock of leases: trio's, less the time this process could not run (counted by
        `_watchdog`, and the part not counted yet), so a lease never runs out while the
        coordinator could not read the renewal waiting for it."""
        now = trio.current_time()
        late = 0.0 if self._due is None else max(0.0, now - self._due)
        return now - self._deaf - late

    def _heard_from(self, node: int) -> None:
        """``node`` is alive: a message of it arrived."""
        self._heard[node] = self._awake()

    async def _sleep(self) -> None:
        wait = self._tick
        at = self._clock()
        # a follower never reads its replica here: it stays encoded (see `merge_encoded`)
        ready = self.table.next_ready(at) if self._leading else None
        if ready is not None:
            wait = min(wait, ready - at)
        asleep = trio.current_time()
        if self._held:
            due = min(d for held in self._held.values() for _, d in held)
            wait = min(wait, max(0.0, due - asleep))
        with trio.move_on_after(wait):
            await self._wake.wait()
        if trio.current_time() - asleep > wait + self.lease_s / 2:
            self._stalled = True
        self._wake = trio.Event()

    def poke(self) -> None:
        """Run the loop now (something changed)."""
        self._wake.set()

    async def step(self) -> None:
        """One round: take over or step down, requeue lost work, place, make durable, send."""
        if self._leader() != self.rank:
            if self._leading:
                log.info("farm: no longer the coordinator", rank=self.rank, leader=self._leader())
                self._step_down()
            return
        if self._leading and self._stalled:
            # frozen past half a lease: another node may have led meanwhile
            log.warning("farm: stalled; taking the farm over again", rank=self.rank)
            self._step_down()
        self._stalled = False
        if not self._leading:
            await self._take_over()
        now = self._awake()
        at = self._clock()
        self._requeue_lost(now, at)
        self._schedule(now, at)
        self._count()
        await self._flush()
        self._answer_held()

    def _step_down(self) -> None:
        self._leading = False
        self._leases.clear()
        self._disowned.clear()
        for recovery in self._recoveries.values():
            recovery.end(Outcome.FAILED, reason="the coordinator stepped down")
        self._recoveries.clear()
        replies, self._replies = self._replies, []
        refusal = self._refusal()
        held, self._held = self._held, {}
        for queries in held.values():  # ask the new coordinator
            for query, _ in queries:
                self._send_reply(query, refusal)
        for request, _ in replies:  # never made durable here: ask the new coordinator
            node_report = isinstance(request.body, Update)
            self._send_reply(request, Ack(False, refusal.reason) if node_report else refusal)

    async def _take_over(self) -> None:
        """Become the coordinator: gather the table (store, or every live replica), then
        give every task on a node a fresh lease to renew with us.

        Changes this node made but never saved (it led before, then froze or lost the lead)
        were never acknowledged to anyone: the saved versions replace them."""
        if self._durable is not None:  # the store's table is the truth
            records = [TaskRecord.from_bytes(b) for b in await self._durable.load()]
            self.table = TaskTable()
            self.table.merge(records)
        else:
            pulled: list[TaskRecord] = []
            for peer in self._peers():
                try:
                    await self._pull(peer, pulled)
                except ClusterError as exc:  # the pages it gave are kept
                    log.info("farm: table pull failed", peer=peer, error=str(exc))
            self.table.drop_unsaved(pulled)
            self.table.merge(pulled)
        now = self._awake()
        for rec in self.table.live_on_nodes():
            self._leases[rec.task_id] = now + self.lease_s
        for rec in self.table:
            self.table.bump(rec)  # everyone gets the merged table, above any older copy
        self._offers_dirty = True
        self._leading = True
        log.info("farm: coordinator", rank=self.rank, tasks=len(self.table))

    async def _pull(self, peer: int, into: list[TaskRecord]) -> None:
        """``peer``'s replica of the table, page by page (`TABLE_CHUNK` records each)."""
        after, after_id = 0, ""
        while True:
            got = await self.link.request(
                peer,
                TablePull(self.rank, after, after_id, TABLE_CHUNK),
                timeout=self._timeout,
                expect=TableUpdate,
            )
            page = [TaskRecord.from_bytes(b) for b in _records(got)]
            into.extend(page)
            self._take_offers(got.body)
            if not got.body.more or not page:
                return
            last = max(page, key=lambda r: (r.seq, r.task_id))
            after, after_id = last.seq, last.task_id

    def _peers(self) -> list[int]:
        return [r for r in self._live() if r != self.rank]

    # -- the coordinator's round -----------------------------------------------------------

    def _requeue_lost(self, now: float, at: float) -> None:
        live = set(self._live())
        for rec in self.table.live_on_nodes():
            node = rec.node
            if node is None:
                continue
            if node not in live:
                self._moved(rec.task_id, at, f"node {node} lost", Trigger.PEER_LOST, node)
                continue
            if rec.task_id in self._disowned:
                dropped = f"node {node} no longer runs it"
                self._moved(rec.task_id, at, dropped, Trigger.HEARTBEAT_TIMEOUT, node)
                continue
            deadline = self._leases.setdefault(rec.task_id, now + self.lease_s)
            if now <= deadline:
                continue
            why = self._lapsed(node, now, deadline)
            if why is not None:
                self._moved(rec.task_id, at, why, Trigger.HEARTBEAT_TIMEOUT, node)

    def _current(self, assign: Assign, node: int) -> bool:
        """Whether ``assign`` (to ``node``) is still its task's current attempt."""
        return self.table.current(assign.task_id, assign.fence, node) is not None

    def _lapsed(self, node: int, now: float, deadline: float) -> str | None:
        """Why a lease on ``node``, run out at ``deadline``, is a loss; None while the node
        shows it lives (its renewal is merely late: a slow node or link must not lose its
        tasks, nor run them twice), up to `LAPSE_LIMIT` more leases."""
        heard = self._heard.get(node)
        if heard is None or now - heard > self.lease_s:
            return f"lease expired on node {node}"  # no sign of life for a whole lease
        if now - deadline > LAPSE_LIMIT * self.lease_s:
            return f"lease expired on node {node} ({LAPSE_LIMIT} leases without a renewal)"
        return None

    def _moved(self, task_id: str, at: float, why: str, trigger: Trigger, node: int) -> None:
        self._leases.pop(task_id, None)
        self._disowned.discard(task_id)
        moved = self.table.lost(task_id, at, why)
        if moved is None:
            return
        log.warning("farm: task moved off its node", task=task_id, node=node, why=why)
        if moved.state is not TaskState.PENDING:
            if moved.state in TERMINAL:
                self.metrics.finished(moved.state)
            return
        old = self._recoveries.pop(task_id, None)
        if old is not None:
            old.end(Outcome.FAILED, reason="moved again")
        recovery = RecoveryTrace.begin(trigger, rank=self.rank, values={TASK_ID_ATTR: task_id})
        recovery.event(RecoveryEvent.DETECTED, reason=why)
        with recovery.phase(Phase.DETECT):
            pass
        self._recoveries[task_id] = recovery

    def _views(self, *, use: bool = True) -> list[NodeView]:
        """The live nodes that offered; with ``use``, what their tasks use (summed in whole
        units: one `Resources` per node, not one per task), else nothing used (a submit's
        check looks only at capacity)."""
        live = set(self._live())
        used: dict[int, list[int]] = {}  # node: [millicpu, memory, gpus, tasks]
        if use:
            for rec in self.table.live_on_nodes():
                if rec.node is not None:
                    u = used.get(rec.node)
                    if u is None:
                        u = used[rec.node] = [0, 0, 0, 0]
                    needs = rec.needs
                    u[0] += needs.millicpu
                    u[1] += needs.memory
                    u[2] += needs.gpus
                    u[3] += 1
        none = [0, 0, 0, 0]
        views = []
        for rank, offer in sorted(self.offers.items()):
            if rank not in live:
                continue
            m, memory, gpus, running = used.get(rank, none)
            views.append(
                NodeView(
                    rank, offer.capacity, Resources(m / MILLI, memory, gpus), offer.labels, running
                )
            )
        return views

    def _schedule(self, now: float, at: float) -> None:
        requests = self.table.requests(at, PLACE_WINDOW)
        if not requests:
            return
        views = self._views()
        if not views:
            return
        if not _room(requests, views):
            return  # nothing fits anywhere now: the scheduler need not look
        ranks = frozenset(v.rank for v in views)
        # the node a task was lost from is avoided, unless it is the only one left
        requests = [attrs.evolve(r, avoid=frozenset()) if ranks <= r.avoid else r for r in requests]
        for placement in place(requests, views, self.strategy):
            rec = self.table.place(placement.task_id, placement.rank, at, self._next_fence)
            self._leases[rec.task_id] = now + self.lease_s
            self._disowned.discard(rec.task_id)
            trace: Mapping[str, str] = {}
            recovery = self._recoveries.get(rec.task_id)
            if recovery is not None:
                try:
                    _selected(recovery, placement.rank, str(placement.why))
                except TelemetryError:  # placed again (its assignment refused): a retry
                    recovery.next_attempt()
                    _selected(recovery, placement.rank, str(placement.why))
                trace = recovery.inject()
            assign = Assign(
                rec.task_id,
                rec.attempt,
                rec.fence,
                rec.spec,
                rec.needs.to_json(),
                self.lease_s,
                sorted(rec.replicas) if rec.attempt > 1 else [],
            )
            self._orders.append((placement.rank, assign, trace))

    def _next_fence(self, fence: int) -> int:
        return (fence // FENCE_STRIDE + 1) * FENCE_STRIDE + self.rank

    def _count(self) -> None:
        self.metrics.set_counts(self.table.counts())

    async def _flush(self) -> None:
        """Make the changes durable, then send what depends on them (replies, orders).
        What is taken here is what this save covers: changes, replies and orders made while
        it runs wait for the next one."""
        encoded = [(r.task_id, r.rev, r.to_bytes()) for r in self.table.dirty]
        offers = self._offers_dirty
        replies, self._replies = self._replies, []
        orders, self._orders = self._orders, []
        if encoded or offers:
            self._offers_dirty = False
            try:
                await self._save([(tid, data) for tid, _, data in encoded], offers)
            except _NotSaved as exc:  # no peer took it: act on nothing yet, try again
                log.info("farm: table update taken by no peer; again", error=str(exc))
                self._offers_dirty = self._offers_dirty or offers
                self._replies = replies + self._replies
                self._orders = orders + self._orders
                await trio.sleep(self._tick)
                return
            except Exception as exc:  # a deposed leader's fenced write, a store outage
                log.warning("farm: saving the table failed; stepping down", error=str(exc))
                self._offers_dirty = True
                self._replies = replies + self._replies  # refused by the step-down
                self._step_down()
                return
            self.table.flushed({tid: rev for tid, rev, _ in encoded})
        for request, message in replies:
            self._send_reply(request, message)
        for peer, message, trace in orders:
            self._spawn(self._order, peer, message, trace)

    async def _save(self, records: list[tuple[str, bytes]], offers: bool) -> None:
        if self._durable is not None and records:
            await self._durable.save(records)
        peers = self._peers()
        if not peers:
            return
        sent = [data for _, data in records] if self._durable is None else []
        offered = self._offer_list() if offers else []
        if not sent and not offered:
            return
        # bounded requests, the records as payload (never in the 64 KiB header); each chunk
        # is held by at least one live peer before the next goes. The pushes run on their
        # own: a dead peer not yet declared lost (or a slow one) holds up nothing once
        # another peer took the chunk (the move of a lost node's tasks waited for its 5 s
        # timeout); records merge by revision, so a late push does no harm.
        chunks = [sent[i : i + TABLE_CHUNK] for i in range(0, len(sent), TABLE_CHUNK)] or [[]]
        for i, chunk in enumerate(chunks):
            update = TableUpdate(self.rank, [], offered if i == 0 else [])
            frames = _pack_frames(chunk) if chunk else []
            pushes = _Pushes(len(peers))
            assert self._nursery is not None  # saves run inside the control plane's run()
            for peer in peers:
                if self._in_flight.get(peer, 0) >= MAX_PUSHES_IN_FLIGHT:
                    pushes.done(peer, taken=False)  # it holds the table via the others
                    continue
                self._in_flight[peer] = self._in_flight.get(peer, 0) + 1
                self._spawn(self._push, peer, update, frames, pushes)
            if not chunk:
                continue  # offers only: nothing waits for them
            await pushes.settled.wait()
            if not pushes.taken:
                raise _NotSaved(f"no reply from ranks {peers}")

    async def _push(
        self, peer: int, update: TableUpdate, frames: list[bytes], pushes: _Pushes
    ) -> None:
        taken = False
        try:
            await self.link.request(peer, update, timeout=self._timeout, expect=Ack, frames=frames)
        except ClusterError as exc:  # a lost peer is requeued by membership, not here
            log.info("farm: table update not taken", peer=peer, error=str(exc))
        else:
            taken = True
            self._heard_from(peer)
        finally:
            self._in_flight[peer] -= 1
            pushes.done(peer, taken=taken)

    def _offer_list(self) -> list[tuple[int, dict[str, Any], list[str]]]:
        return [
            (rank, o.capacity.to_json(), sorted(o.labels))
            for rank, o in sorted(self.offers.items())
        ]

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _send_reply(self, request: Incoming[Any], message: object) -> None:
        self._spawn(self._reply, request, message)

    async def _reply(self, request: Incoming[Any], message: object) -> None:
        try:
            await self.link.reply(request, message)
        except (ClusterError, trio.ClosedResourceError) as exc:
            log.info("farm: reply not sent", error=str(exc))
        except ValueError as exc:  # not sendable (over the header bound): never a crash here
            log.error("farm: reply not sendable", kind=type(message).__name__, error=str(exc))

    async def _order(self, peer: int, message: object, trace: Mapping[str, str]) -> None:
        """Send an assignment or a stop; an assignment the node refuses or never takes is
        a start failure (the task goes back to pending, avoiding that node)."""
        why = ""
        try:
            got = await self.link.request(
                peer, message, trace=trace, timeout=self._timeout, expect=Ack
            )
            self._heard_from(peer)
            if got.body.ok and isinstance(message, Assign) and self._current(message, peer):
                self._leases[message.task_id] = self._awake() + self.lease_s  # starts now
            if not got.body.ok:
                why = got.body.reason or "refused"
        except ClusterError as exc:
            why = str(exc) or type(exc).__name__
        except ValueError as exc:  # not sendable (a header over the transport's limit)
            why = str(exc)
        if not why or not self._leading:
            return
        if isinstance(message, Assign):
            log.warning("farm: assignment not taken", task=message.task_id, node=peer, why=why)
            self.table.refused(message.task_id, message.fence, peer, self._clock(), why)
            self.poke()
        elif isinstance(message, Stop) and self.table.current(message.task_id, message.fence):
            log.info("farm: stop not delivered; again", task=message.task_id, node=peer, why=why)
            await trio.sleep(self._tick)  # while the attempt is current (else: moot)
            self._orders.append((peer, message, trace))
            self.poke()

    # -- handlers: farm nodes --------------------------------------------------------------

    async def _on_offer(self, msg: Incoming[Offer]) -> object:
        o = msg.body
        if _forged(msg, o.node):
            return Ack(False, f"rank {msg.sender} cannot speak for node {o.node}")
        try:
            offer = _Offer(Resources.from_json(o.capacity), frozenset(o.labels))
        except (ValueError, TypeError) as exc:
            return Ack(False, f"bad offer: {exc}")
        self._heard_from(o.node)
        if self.offers.get(o.node) != offer:
            self.offers[o.node] = offer
            self._offers_dirty = True
            self.poke()
        return Ack(True)

    async def _on_renew(self, msg: Incoming[Renew]) -> object:
        r = msg.body
        if _forged(msg, r.node):
            return Renewed(ok=False, reason=f"rank {msg.sender} cannot speak for node {r.node}")
        self._heard_from(r.node)
        if not self._leads_now():
            return Renewed(ok=False, reason=self._refusal().reason)
        now = self._awake()
        stale = []
        try:
            held = [*r.held, *(_held(x) for x in _unpack_frames(msg, "renewal"))]
        except (TableError, ValueError, TypeError) as exc:
            return Renewed(ok=False, reason=f"bad renewal: {exc}")
        for task_id, fence in held:
            if self.table.current(task_id, fence, r.node) is None:
                stale.append(task_id)
            else:
                self._leases[task_id] = now + self.lease_s
                self._disowned.discard(task_id)
        for task_id, fence in r.dropped:  # ended there without a report: move it now
            if self.table.current(task_id, fence, r.node) is not None:
                self._disowned.add(task_id)
                self.poke()
        return Renewed(stale)

    async def _on_update(self, msg: Incoming[Update]) -> object:
        u = msg.body
        if _forged(msg, u.node):
            return Ack(False, f"rank {msg.sender} cannot speak for node {u.node}")
        if u.result is None and u.phase is AttemptPhase.COMPLETED and (blob := _frame(msg)):
            u = attrs.evolve(u, result=blob)  # a large result comes as the payload
        self._heard_from(u.node)
        if not self._leads_now():
            return Ack(False, self._refusal().reason)
        verdict = self.table.update(u, self._clock())
        if verdict is UpdateVerdict.STALE:
            log.info("farm: stale fence refused", task=u.task_id, node=u.node, fence=u.fence)
            return Ack(False, STALE_FENCE)
        rec = self.table.get(u.task_id)
        self._leases[u.task_id] = self._awake() + self.lease_s
        self._disowned.discard(u.task_id)
        self._recovered(u.task_id, rec)
        if rec.state in TERMINAL:
            self._leases.pop(u.task_id, None)
            self.metrics.finished(rec.state)
        self.poke()
        if u.phase in _QUIET_PHASES:
            return Ack(True)
        self._replies.append((msg, Ack(True)))
        return DEFERRED

    def _recovered(self, task_id: str, rec: TaskRecord) -> None:
        recovery = self._recoveries.get(task_id)
        if recovery is None:
            return
        if rec.state in (TaskState.RUNNING, TaskState.COMPLETED):
            del self._recoveries[task_id]
            recovery.end(Outcome.COMPLETED)
        elif rec.state in TERMINAL or rec.state is TaskState.PAUSED:
            del self._recoveries[task_id]
            recovery.end(Outcome.FAILED, reason=f"task {rec.state}")

    # -- handlers: clients -----------------------------------------------------------------

    async def _on_submit(self, msg: Incoming[Submit]) -> object:
        s = msg.body
        if not self._leads_now():
            return self._refusal()
        spec_bytes = s.spec or _frame(msg) or b""  # a large spec comes as the payload
        if len(spec_bytes) > MAX_SPEC_BYTES:
            return FarmRefusal(
                f"task spec is {len(spec_bytes)} bytes, at most {MAX_SPEC_BYTES} "
                "(it travels in the assignment): pass large data by path"
            )
        try:
            spec = TaskSpec.from_bytes(spec_bytes)
            needs = Resources.from_json(s.needs)
            labels = frozenset(s.labels)
        except (CorruptRecord, ValueError, TypeError) as exc:
            return FarmRefusal(f"bad task: {exc}")
        views = self._views(use=False)  # capacity only: no sum over the running tasks
        # judged once every live node said what it offers: a node still starting may be the
        # one that fits (a task submitted as the farm comes up was refused)
        offered = all(rank in self.offers for rank in self._live())
        why = unschedulable(needs, labels, views) if views and offered else None
        if why is not None:
            return FarmRefusal(why, self.rank, unschedulable=True)
        try:
            rec, _new = self.table.submit(
                spec,
                needs,
                self._clock(),
                labels=labels,
                priority=s.priority,
                max_attempts=s.max_attempts,
                non_retryable=tuple(s.non_retryable),
                spec_bytes=spec_bytes,
            )
        except TableError as exc:
            return FarmRefusal(str(exc), self.rank)
        self.poke()
        self._replies.append((msg, _task_reply(record_json(rec))))
        return DEFERRED

    async def _on_query(self, msg: Incoming[Query]) -> object:
        q = msg.body
        if not self._leads_now():
            return self._refusal()
        if q.task_id is None:
            tasks = [record_json(r, history=q.history) for r in self.table]
        else:
            try:
                tasks = [record_json(self.table.get(q.task_id), history=q.history)]
            except UnknownTask as exc:
                return FarmRefusal(str(exc), self.rank, unknown=True)
        packed = _pack(tasks)
        if len(packed) <= INLINE_BYTES:
            return TaskList(tasks)
        return Reply(TaskList([]), frames=_pack_frames(tasks))  # a long list: the payload

    async def _on_control(self, msg: Incoming[Control]) -> object:
        c = msg.body
        if not self._leads_now():
            return self._refusal()
        try:
            order = self.table.control(c.task_id, c.action, self._clock())
        except UnknownTask as exc:
            return FarmRefusal(str(exc), self.rank, unknown=True)
        except TableError as exc:
            return FarmRefusal(str(exc), self.rank)
        rec = self.table.get(c.task_id)
        if rec.state in TERMINAL:
            self._leases.pop(c.task_id, None)
            self.metrics.finished(rec.state)
        self._recovered(c.task_id, rec)
        if order is not None:
            self._orders.append((order.node, _stop(order), {}))
        self.poke()
        self._replies.append((msg, _task_reply(record_json(rec, history=True))))
        return DEFERRED

    async def _on_result(self, msg: Incoming[ResultQuery]) -> object:
        q = msg.body
        if not self._leads_now():
            return self._refusal()
        try:
            rec = self.table.get(q.task_id)
        except UnknownTask as exc:
            return FarmRefusal(str(exc), self.rank, unknown=True)
        if q.wait > 0 and rec.state not in TERMINAL:  # answered when it ends (or at wait)
            due = trio.current_time() + q.wait
            self._held.setdefault(rec.task_id, []).append((msg, due))
            self.poke()  # the loop's sleep wakes for the deadline
            return DEFERRED
        return _result_reply(rec)

    def _answer_held(self) -> None:
        """Answer the held result queries whose task ended, its end saved (not dirty), and
        those held past their wait (the task's state now: the client asks again)."""
        if not self._held:
            return
        now = trio.current_time()
        for task_id in list(self._held):
            rec = self.table.find(task_id)
            ended = rec is not None and rec.state in TERMINAL and self.table.saved(task_id)
            keep = []
            for query, due in self._held[task_id]:
                if rec is None:
                    self._send_reply(
                        query, FarmRefusal(f"no task {task_id!r}", self.rank, unknown=True)
                    )
                elif ended or due <= now:
                    self._send_reply(query, _result_reply(rec))
                else:
                    keep.append((query, due))
            if keep:
                self._held[task_id] = keep
            else:
                del self._held[task_id]

    # -- handlers: the replicated table ----------------------------------------------------

    async def _on_table(self, msg: Incoming[TableUpdate]) -> object:
        if msg.sender is not None:
            self._heard_from(msg.sender)  # the coordinator's node lives
        self._take_table(msg)
        return Ack(True)

    def _take_table(self, msg: Incoming[TableUpdate]) -> None:
        self.table.merge_encoded(_records(msg))  # decoded when read (a take-over, a pull)
        self._take_offers(msg.body)

    def _take_offers(self, update: TableUpdate) -> None:
        if self._leading:
            return  # the nodes offer to this coordinator themselves
        for rank, capacity, labels in update.offers:
            self.offers[rank] = _Offer(Resources.from_json(capacity), frozenset(labels))

    async def _on_pull(self, msg: Incoming[TablePull]) -> object:
        q = msg.body
        recs = list(self.table)  # in submission order
        if q.after or q.after_id:
            recs = [r for r in recs if (r.seq, r.task_id) > (q.after, q.after_id)]
        more = bool(q.limit) and len(recs) > q.limit
        if more:
            recs = recs[: q.limit]
        frames = _pack_frames([r.to_bytes() for r in recs]) if recs else []
        return Reply(TableUpdate(self.rank, [], self._offer_list(), more), frames=frames)


def _result_reply(rec: TaskRecord) -> object:
    """A task's outcome for a client: a large result as the payload."""
    result = rec.result
    if result is None or len(result) <= INLINE_BYTES:
        return ResultReply(rec.task_id, str(rec.state), result, rec.error)
    reply = ResultReply(rec.task_id, str(rec.state), None, rec.error)
    return Reply(reply, frames=[result])


def _pack(items: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


def _pack_frames(items: list[Any]) -> list[bytes]:
    """``items`` packed as lists, one payload frame each, each at most `FRAME_BYTES` (an item
    larger than that alone in its frame)."""
    packed = _pack(items)
    if len(packed) <= FRAME_BYTES or len(items) < 2:
        return [packed]
    half = len(items) // 2
    return _pack_frames(items[:half]) + _pack_frames(items[half:])


def _unpack_frames(msg: Incoming[Any], what: str) -> list[Any]:
    """The items of every payload frame (each a packed list), in order."""
    out: list[Any] = []
    for buf in msg.buffers:
        items = msgpack.unpackb(buf, raw=False)
        if not isinstance(items, list):
            raise TableError(f"{what} payload: not a list")
        out.extend(items)
    return out


def _held(item: object) -> tuple[str, int]:
    """One ``(task_id, fence)`` of a renewal's payload."""
    if not isinstance(item, list | tuple) or len(item) != 2:
        raise TableError("renewal payload: not a list of (task id, fence)")
    task_id, fence = item
    if not isinstance(task_id, str) or isinstance(fence, bool) or not isinstance(fence, int):
        raise TableError("renewal payload: not a list of (task id, fence)")
    return task_id, fence


def _task_reply(info: dict[str, Any]) -> object:
    """One task for a client: in the header when small, else as the payload of a `TaskList`
    (a long history or error)."""
    packed = _pack([info])
    if len(packed) <= INLINE_BYTES:
        return TaskReply(info)
    return Reply(TaskList([]), frames=[packed])


def _frame(msg: Incoming[Any]) -> bytes | None:
    """The first payload frame, if any."""
    buffers = msg.buffers
    return bytes(buffers[0]) if buffers else None


def _records(msg: Incoming[TableUpdate]) -> list[bytes]:
    """A table update's records: in its header (small) and its payload (packed lists)."""
    out = list(msg.body.records)
    items = _unpack_frames(msg, "table update")
    if not all(isinstance(b, bytes) for b in items):
        raise TableError("table update payload: not a list of records")
    out.extend(items)
    return out


class _Pushes:
    """One chunk's pushes to the peers: settled once a peer took it, or every push ended."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.taken: list[int] = []
        self.settled = trio.Event()

    def done(self, peer: int, *, taken: bool) -> None:
        self.left -= 1
        if taken:
            self.taken.append(peer)
        if self.taken or self.left <= 0:
            self.settled.set()


class _NotSaved(Exception):
    """No live peer took a table update (without a store): nothing may act on it yet."""


def _forged(msg: Incoming[Any], node: int) -> bool:
    """Whether a farm node's message claims another node than the rank that sent it (a
    client, with no rank, never sends these)."""
    return msg.sender != node


def _room(requests: Sequence[Request], views: Sequence[NodeView]) -> bool:
    """Whether some node has room for the smallest needs of each kind (a cheap lower bound:
    False means no request fits anywhere)."""
    least = Resources(
        min(r.needs.cpu for r in requests),
        min(r.needs.memory for r in requests),
        min(r.needs.gpus for r in requests),
    )
    return any(least.fits_in(v.capacity - v.used) for v in views)


def _selected(recovery: RecoveryTrace, rank: int, why: str) -> None:
    """The recovery's select_checkpoint phase: the task placed on ``rank`` (``why``)."""
    with recovery.phase(Phase.SELECT_CHECKPOINT, {"supervise.placement": why}):
        recovery.event(RecoveryEvent.CHECKPOINT_SELECTED, rank=rank)


def _stop(order: StopOrder) -> Stop:
    return Stop(order.task_id, order.fence, order.why)
