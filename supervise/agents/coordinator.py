"""Coordinator: the node that runs cluster-wide (re)starts, chosen without a server.

The coordinator is the lowest live rank that is not joining (the lowest live rank when every
node is joining). It starts the cluster once every node is up, and runs each recovery as one
trace: detect -> select_checkpoint (stop every node's workers, gather what each holds, wait for
lost nodes to be replaced, pick the version) -> every node fetches, restores and resumes.
Attempts that fail are retried with the policy's backoff up to ``recovery.max_attempts``;
then every node gives up.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import attrs
import structlog
import trio

from supervise.agents import messages as m
from supervise.agents._tracing import maybe_phase, slowest_source
from supervise.agents.context import NodeContext
from supervise.agents.lifecycle import CLUSTER_START, EXIT_GAVE_UP, ExecutorState, RestartProgress
from supervise.agents.monitor import Beat, blame, hang_evidence
from supervise.agents.roles import Executing
from supervise.agents.seat import SeatNews
from supervise.agents.selection import Holdings, NoVersion, Selection, select
from supervise.agents.standbys import Standbys
from supervise.cluster import Incoming, RemoteError
from supervise.cluster.failure_detector import Event, PeerBack, PeerLost
from supervise.cluster.transport import normalize_endpoint
from supervise.snapshot.service import FRESH
from supervise.store import FencedWriteRefused, StoreUnavailable
from supervise.telemetry import (
    Attr,
    Outcome,
    Phase,
    RecoveryEvent,
    RecoveryTrace,
    Trigger,
    get_telemetry,
)

log = structlog.get_logger("supervise.agents.coordinator")

_HELD = 64  # reports kept while not elected (--store); older ones are dropped first
# A node whose agent just started (a replacement, a standby taking over) heartbeats before
# its executor handles requests: such a refusal is asked again soon, not an attempt failed.
_NO_HANDLER = "no handler for message kind"
_STARTING_RETRY = 0.02


@attrs.frozen(slots=True)
class _Manual:
    version: int


@attrs.frozen(slots=True)
class _Tick:
    pass


class AttemptFailed(Exception):
    """One restart attempt did not reach every node's first step (``failure``: the report
    that ended it, if a node reported one)."""

    def __init__(self, reason: str, failure: m.Failure | None = None) -> None:
        super().__init__(reason)
        self.failure = failure


class Coordinator:
    """Cluster-wide starts and recoveries, while this node is the coordinator."""

    def __init__(self, ctx: NodeContext, node: Executing) -> None:
        self.ctx = ctx
        self.node = node  # this node's executor
        self.rank = ctx.config.rank
        self._send, self._inbox = trio.open_memory_channel[tuple[object, dict[str, str]]](1024)
        self._attempts = 0
        self._stable_since: float | None = None
        self._membership_changed = trio.Event()
        self._churned: set[int] = set()  # nodes lost or replaced since the last prepare began
        self._callbacks: trio.Nursery | None = None  # the policy's callbacks run here
        # --store: reports and membership changes seen while not elected (stale ones are
        # dropped when replayed, by their generation)
        self._held: collections.deque[tuple[object, dict[str, str]]] = collections.deque(
            maxlen=_HELD
        )
        self._no_quorum = False  # --store: a recovery is held for want of a quorum (said once)
        self._recovery: RecoveryTrace | None = None  # the recovery this node runs, if any
        # hot standby agents heard lately, and the lost ranks given to them
        self.standbys = Standbys(ctx.policy.cluster.peer_timeout)
        if ctx.seat is not None:
            ctx.seat.observer = self._seat_news

    # -- inputs (never block) --------------------------------------------------------------

    def receive(self, message: object, trace: dict[str, str]) -> None:
        """A Failure or Progress from a node (or from this node's executor)."""
        try:
            self._send.send_nowait((message, trace))
        except trio.WouldBlock:
            log.error("coordinator inbox full; message dropped", message=type(message).__name__)

    def membership_event(self, event: Event) -> None:
        if isinstance(event, PeerLost) or (isinstance(event, PeerBack) and event.restarted):
            self._churned.add(event.rank)
        self._membership_changed.set()
        self.receive(event, {})

    async def manual(self, version: int, trace: dict[str, str]) -> str:
        """`supervise recover`: a recovery at ``version`` (-1: by the policy's rule).

        A version that is not complete on the live nodes is refused before any worker is
        stopped (raises `ValueError` with the reason); training goes on undisturbed. So is a
        request while a recovery runs (it would be ignored: the caller is told, not misled).
        """
        if self._recovery is not None:
            raise ValueError("a recovery is in progress: ask again once training resumed")
        if version >= 0:
            holdings = await self._holdings_now()
            try:
                self._select(holdings, version, manual=True)
            except NoVersion as exc:
                raise ValueError(f"cannot recover to version {version}: {exc}") from None
        self.receive(_Manual(version), trace)
        which = "the policy's checkpoint rule" if version < 0 else f"version {version}"
        return f"recovery requested at {which}; coordinator is node {self.rank}"

    async def _holdings_now(self) -> dict[int, Holdings]:
        """What every live node holds right now, without stopping anything."""
        out: dict[int, Holdings] = {self.rank: self.ctx.holdings()}
        for node in self.ctx.membership.live():
            if node == self.rank:
                continue
            try:
                reply = await self.ctx.transport.request(
                    node, m.StatusQuery(), timeout=5.0, expect=m.Status
                )
            except Exception as exc:
                raise ValueError(f"node {node} did not answer: {exc}") from None
            out[node] = reply.body.holdings()
        return out

    # -- hot standbys -----------------------------------------------------------------------

    def standby_hello(self, hello: m.StandbyHello) -> m.StandbyOrder:
        """A standby's hello: noted; the coordinator of a started cluster gives it a lost
        rank (the oldest standby takes the lowest lost rank) and moves that rank's peer link
        to it, here and on every live node."""
        now = trio.current_time()
        self.standbys.heard(hello.name, hello.endpoint, hello.since, now, hello.ranks)
        lead = self.node.coordinator_rank()
        if not self.is_coordinator or self.node.known_generation() == 0 or self.node.state.ended:
            return m.StandbyOrder(-1, coordinator=lead)
        plan = self.standbys.assign(self._missing(), now)
        rank = next((r for r, e in plan.items() if e.name == hello.name), -1)
        if rank < 0:
            return m.StandbyOrder(-1, coordinator=self.rank)
        self._move(rank, hello.endpoint)
        return m.StandbyOrder(rank, self._endpoints(), coordinator=self.rank)

    def _move(self, rank: int, endpoint: str) -> None:
        """Node ``rank`` is served at ``endpoint`` from now on (said once per move)."""
        transport = self.ctx.transport
        if transport.peers.get(rank) == normalize_endpoint(endpoint):
            return
        transport.set_peer(rank, endpoint)
        for node in self.ctx.membership.live():
            if node != self.rank:
                transport.try_send(node, m.RankMoved(rank, endpoint))
        log.warning("a standby takes over a lost node", node=rank, standby=endpoint)
        if self._recovery is not None:
            self._recovery.event("standby_assigned", reason=f"node {rank}: standby {endpoint}")

    def _endpoints(self) -> list[str]:
        """Every node's endpoint as this node knows them now (moved ranks included)."""
        peers = self.ctx.transport.peers
        config = self.ctx.config
        return [
            config.endpoint if r == self.rank else peers.get(r, config.nodes[r])
            for r in range(self.n_nodes)
        ]

    # -- the loop --------------------------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        seat = self.ctx.seat
        if seat is not None:
            return seat.leads()  # --store etcd://...: only the elected leader acts
        return self.node.coordinator_rank() == self.rank

    @property
    def n_nodes(self) -> int:
        return self.ctx.config.n_nodes

    def _unheard(self) -> list[int]:
        """Live peers this node has not heard from yet (their state and generation unknown:
        one of them may be running the cluster)."""
        ms = self.ctx.membership
        return [r for r in ms.live() if r != self.rank and ms.peer_info(r) is None]

    def _missing(self) -> list[int]:
        live = set(self.ctx.membership.live())
        return sorted(set(range(self.n_nodes)) - live - self.node.finished_nodes)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wait for triggers; act on them when this node is the coordinator."""
        try:
            async with trio.open_nursery() as callbacks:
                self._callbacks = callbacks
                task_status.started()
                await self._serve()
        finally:
            self._callbacks = None

    async def _serve(self) -> None:
        tick = self.ctx.policy.cluster.heartbeat_interval
        while True:
            item: tuple[object, dict[str, str]] = (_Tick(), {})
            if self._held and self.is_coordinator and self._quorate():
                item = self._held.popleft()  # what arrived before this node was elected
            else:
                with trio.move_on_after(tick):
                    item = await self._inbox.receive()
            message, trace = item
            state = self.node.state
            if not self.is_coordinator or state.ended:
                if self.ctx.seat is not None and not isinstance(message, _Tick):
                    self._held.append(item)  # --store: kept for when this node is elected
                continue
            if state is ExecutorState.JOINING and self._unheard():
                continue  # a new node leads nothing before it knows every live peer's state
            started = self.node.known_generation() > 0
            if not started:
                if not self._missing():
                    await self._start()
                continue
            trigger = self._trigger_of(message)
            if trigger is None:
                continue
            kind, since, evidence, version = trigger
            if not self._quorate():
                self._hold_for_quorum(kind, item)
                continue
            if kind is Trigger.HEARTBEAT_TIMEOUT:
                since, evidence = await self._judge_hang(since, evidence)
            await self._recover(kind, since, evidence, version=version, parent=trace or None)

    @contextlib.contextmanager
    def _open(self, recovery: RecoveryTrace) -> Iterator[None]:
        """While ``recovery`` runs, the seat's news are span events on it."""
        self._recovery = recovery
        try:
            yield
        finally:
            self._recovery = None

    def _seat_news(self, news: SeatNews) -> None:
        """An election, a lease lost or regained, a fenced write refused: a span event on the
        recovery under way (the seat's log lines carry the same evidence otherwise)."""
        recovery = self._recovery
        if recovery is None:
            return
        evidence: dict[str, object] = {"store_revision": news.revision}
        if news.lease:
            evidence["store_lease"] = f"{news.lease:x}"
        if news.leader is not None:
            evidence["store_leader"] = news.leader
        recovery.event(news.event.value, **evidence)

    def _expected(self) -> list[int]:
        """The nodes a quorum is counted among: every node that has not finished."""
        return [n for n in range(self.n_nodes) if n not in self.node.finished_nodes]

    def _quorate(self) -> bool:
        """The quorum guard (``--store`` only): a majority of the expected nodes hold a live
        lease. Said once when it returns after a recovery was held for want of it."""
        seat = self.ctx.seat
        if seat is None:
            return True  # the embedded store has no quorum (docs/store.md)
        if not seat.quorum(self._expected()):
            return False
        if self._no_quorum:
            self._no_quorum = False
            log.info("quorum regained", members=sorted(seat.members()))
        return True

    def _hold_for_quorum(self, kind: Trigger, item: tuple[object, dict[str, str]]) -> None:
        """Keep a trigger until a majority of the expected nodes is alive again: a minority
        (cut off, or the survivors of a mass loss) must not restart anything."""
        seat = self.ctx.seat
        assert seat is not None
        self._held.append(item)
        get_telemetry().metrics.recoveries_held.add(1, {Attr.TRIGGER: kind.value})
        if not self._no_quorum:
            self._no_quorum = True
            expected = self._expected()
            log.warning(
                "recovery held: no quorum",
                trigger=kind.value,
                members=sorted(seat.members()),
                expected=expected,
                needed=len(expected) // 2 + 1,
            )

    def _trigger_of(
        self, message: object
    ) -> tuple[Trigger, float, dict[str, Any], int | None] | None:
        now = time.time()
        if isinstance(message, m.Failure):
            if message.generation < self.node.known_generation():
                log.debug("stale failure ignored", node=message.node, gen=message.generation)
                return None
            evidence = {"node": message.node, **message.evidence}
            if evidence.get("stop"):
                self._stop(f"recovery.on_nan = stop: {_describe(message)}")
                return None
            return Trigger(message.trigger), message.since, evidence, None
        if isinstance(message, PeerLost) and message.rank not in self.node.finished_nodes:
            if self.ctx.seat is not None and self.ctx.membership.is_alive(message.rank):
                # --store: back, the same process (a restarted one is its own PeerBack), by
                # the time its loss is handled (a lease that lapsed in an etcd outage, a
                # freeze): membership did not change, so no restart and no new generation
                log.info("peer back before its loss was handled: no restart", peer=message.rank)
                return None
            since = now - message.silence
            evidence = {"peer": message.rank, "cause": message.cause.value}
            return Trigger.PEER_LOST, since, evidence, None
        if isinstance(message, PeerBack) and message.restarted:
            return Trigger.PEER_LOST, now, {"peer": message.rank, "restarted": True}, None
        if isinstance(message, _Manual):
            return Trigger.MANUAL, now, {"version": message.version}, message.version
        return None

    async def _judge_hang(
        self, since: float, evidence: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        """A node reported a hang: the rank that stopped stepping first, judged from every
        node's stalled ranks (the reporter's may only be waiting in a collective for a rank
        elsewhere). Returns the hang's start and evidence, naming that rank and its node."""
        recovery = self.ctx.policy.recovery
        reporter, reported = evidence.get("node"), evidence.get("rank")
        beats: dict[int, Beat] = {}
        for raw in evidence.get("stalled", []):
            try:
                b = Beat.from_wire(raw)
            except ValueError as exc:
                log.warning("hang report unreadable", node=reporter, error=str(exc))
                continue
            beats[b.rank] = b
        for b in await self._stalled_elsewhere(skip=reporter):
            beats.setdefault(b.rank, b)
        if not beats:
            return since, evidence
        stalled = blame(beats.values())
        victim = stalled[0]
        judged = {
            "node": victim.rank // self.ctx.config.nproc_per_node,
            **hang_evidence(stalled, recovery),
        }
        if victim.rank != reported:
            judged["reported_by"] = {"node": reporter, "rank": reported}
        judged["stalled"] = judged.pop("stalled")  # the long part last (the trace's reason)
        log.error("worker hung", **judged)
        return victim.last_beat, judged

    async def _stalled_elsewhere(self, *, skip: object) -> list[Beat]:
        """The stalled ranks of every live node but ``skip`` (the reporter), this one
        included; a node that does not answer quickly is left out."""
        recovery = self.ctx.policy.recovery
        found: list[Beat] = []
        if skip != self.rank:
            monitor = self.ctx.monitor()
            found += monitor.beats() if monitor is not None else []
        timeout = min(self.ctx.policy.cluster.peer_timeout, 5.0)

        async def ask(node: int) -> None:
            try:
                reply = await self.ctx.transport.request(
                    node, m.StatusQuery(), timeout=timeout, expect=m.Status
                )
                found.extend(Beat.from_wire(raw) for raw in reply.body.beats)
            except Exception as exc:
                log.info("no heartbeat records from a node", node=node, error=str(exc))

        async with trio.open_nursery() as nursery:
            for node in self.ctx.membership.live():
                if node not in (self.rank, skip) and node not in self.node.finished_nodes:
                    nursery.start_soon(ask, node)
        return [b for b in found if b.stalled(recovery)]

    # -- start -----------------------------------------------------------------------------

    async def _start(self) -> None:
        log.info("starting the cluster", nodes=self.n_nodes)
        try:
            await self._attempt(Trigger.MANUAL, None, attempt=1, version=None, start=True)
        except _Deposed as exc:
            log.warning("deposed before the start: the new coordinator starts", error=str(exc))
            # nodes already prepared count as started (generation 1) to the new coordinator,
            # which then waits for a trigger: the failed start's own (as below) is handed over
            self.node.hand_over(
                Trigger.WORKER_EXIT.value, time.time(), {"start": f"deposed: {exc}"}
            )
        except AttemptFailed as exc:
            log.error("cluster start failed", error=str(exc))
            f = exc.failure
            if f is None:
                await self._recover(Trigger.WORKER_EXIT, time.time(), {"start": str(exc)})
            else:
                trigger, since = Trigger(f.trigger), f.since
                evidence = {"node": f.node, **f.evidence}
                if trigger is Trigger.HEARTBEAT_TIMEOUT:
                    since, evidence = await self._judge_hang(since, evidence)
                await self._recover(trigger, since, {"during": "start", **evidence})
        else:
            self._stable_since = trio.current_time()

    # -- recovery --------------------------------------------------------------------------

    async def _recover(
        self,
        trigger: Trigger,
        since: float,
        evidence: Mapping[str, Any],
        *,
        version: int | None = None,
        parent: Mapping[str, str] | None = None,
    ) -> None:
        policy = self.ctx.policy.recovery
        reset_after = policy.backoff.reset_after
        if (
            self._stable_since is not None
            and reset_after is not None
            and trio.current_time() - self._stable_since >= reset_after
        ):
            self._attempts = 0
        since_ns = int(min(since, time.time()) * 1e9)
        recovery = RecoveryTrace.begin(
            trigger,
            rank=self.rank,
            attempt=self._attempts + 1,
            parent=parent,
            start_time_ns=since_ns,
        )
        # The root is current for the whole recovery (its log lines carry the trace id);
        # leaving by an exception (a bug, or cancelled: the node is stopping) ends it failed.
        with recovery, recovery.activate(), self._open(recovery):
            log.warning("recovery", trigger=trigger.value, evidence=dict(evidence))
            failed = evidence.get("rank")
            if isinstance(failed, int) and not isinstance(failed, bool):
                recovery.set(rank=failed)  # the training rank that failed (hung, exited...)
                recovery.event(RecoveryEvent.DETECTED, reason=_short(evidence), rank=failed)
            else:
                recovery.event(RecoveryEvent.DETECTED, reason=_short(evidence))
            with recovery.phase(Phase.DETECT, start_time_ns=since_ns):
                pass
            recovery.event(RecoveryEvent.STARTED)
            first = True
            while True:
                self._attempts += 1
                if self._attempts > policy.max_attempts:
                    reason = (
                        f"recovery exhausted: {self._attempts - 1} attempt(s) failed "
                        f"(recovery.max_attempts = {policy.max_attempts}); "
                        f"last trigger {trigger.value}"
                    )
                    recovery.end(Outcome.EXHAUSTED, reason=reason)
                    self._callback(policy.on_failure, trigger, Outcome.EXHAUSTED, reason)
                    self._stop(reason)
                    return
                if not first:
                    recovery.next_attempt()
                first = False
                delay = policy.backoff.delay(self._attempts, random.random())
                if delay > 0:
                    log.info("backing off before the restart", seconds=round(delay, 3))
                    await trio.sleep(delay)
                try:
                    sel_step = await self._attempt(
                        trigger, recovery, attempt=self._attempts, version=version
                    )
                except _Deposed as exc:
                    log.warning("deposed: the new coordinator recovers", error=str(exc))
                    recovery.end(Outcome.FAILED, reason=f"deposed: {exc}")
                    # nodes this attempt prepared wait at a new generation, where the new
                    # coordinator counts older reports stale: it must hear the trigger
                    self.node.hand_over(trigger.value, since, evidence)
                    return
                except _GiveUp as exc:
                    recovery.end(Outcome.FAILED, reason=str(exc))
                    self._callback(policy.on_failure, trigger, Outcome.FAILED, str(exc))
                    self._stop(str(exc))
                    return
                except AttemptFailed as exc:
                    log.error("recovery attempt failed", attempt=self._attempts, error=str(exc))
                    continue
                recovery.end(Outcome.COMPLETED, snapshot_version=max(sel_step, 0))
                self._stable_since = trio.current_time()
                self._callback(policy.on_recovery, trigger, Outcome.COMPLETED, f"step {sel_step}")
                return

    async def _attempt(
        self,
        trigger: Trigger,
        recovery: RecoveryTrace | None,
        *,
        attempt: int,
        version: int | None,
        start: bool = False,
    ) -> int:
        """One restart of every node's workers; returns the step restarted at."""
        gen = self.node.known_generation() + 1
        await self._fence(
            lambda: self._claim(gen, attempt, CLUSTER_START if start else trigger.value)
        )
        carrier = recovery.inject() if recovery is not None else {}
        with maybe_phase(recovery, Phase.SELECT_CHECKPOINT) as ph:
            while True:
                await self._wait_for_nodes(recovery)
                self._churned.clear()
                try:
                    replies = await self._prepare_all(gen, carrier)
                except AttemptFailed as exc:
                    if self._missing() or self._churned:
                        # a node died or was replaced meanwhile: wait for (or prepare) its
                        # replacement, within this attempt and generation
                        log.info("prepare again: membership changed", error=str(exc))
                        continue
                    raise
                break
            holdings = {node: reply.holdings() for node, reply in replies.items()}
            selection = self._select(holdings, version, recovering=not start)
            step = FRESH if selection is None else selection.step
            if ph is not None and selection is not None:
                ph.set(
                    snapshot_version=step,
                    snapshot_step=step,
                    snapshot_source=_source_summary(selection),
                    bytes=selection.nbytes,
                )
        port = next((h.port for h in replies.values() if h.port), 0)
        if port == 0:
            raise AttemptFailed("the node hosting rank 0 offered no rendezvous port")
        if recovery is not None:
            recovery.set(generation=gen)
            if selection is None:
                recovery.event(RecoveryEvent.CHECKPOINT_SELECTED, reason="fresh start")
            else:
                chosen = {
                    "snapshot_version": step,
                    "snapshot_step": step,
                    "snapshot_source": _source_summary(selection),
                    "bytes": selection.nbytes,
                }
                recovery.set(**chosen)  # the root says where the recovery went, as a whole
                recovery.event(RecoveryEvent.CHECKPOINT_SELECTED, **chosen)
        rewinds = list(self.node.rewinds)
        if step != FRESH:
            rewinds.append((gen, step))
        nodes = [n for n in range(self.n_nodes) if n not in self.node.finished_nodes]
        why = CLUSTER_START if start else trigger.value
        restarts: dict[int, m.Restart] = {}
        for node in nodes:
            fetch: list[tuple[int, str, int]] = []
            if selection is not None:
                for rank, origin in selection.fetches_for(
                    node, self.ctx.config.ranks_of(node)
                ).items():
                    fetch.append((rank, origin.source.value, origin.node))
            restarts[node] = m.Restart(gen, step, port, attempt, why, fetch, rewinds)
        # --store: the decision, whole, is in the store before any node hears of it; the
        # followers restart from it (the messages below only tell them to look now)
        await self._fence(lambda: self._decide(restarts, nodes, carrier))
        for node in nodes:
            await self._deliver(node, restarts[node], carrier)
        log.info("restart sent", generation=gen, step=step, port=port, attempt=attempt)
        await self._await_resumed(gen, nodes, recovery)
        return step

    async def _claim(self, gen: int, attempt: int, trigger: str) -> None:
        """With a store: claim the attempt, fenced, before stopping or telling any node."""
        if self.ctx.seat is not None:
            await self.ctx.seat.claim(generation=gen, attempt=attempt, trigger=trigger)

    async def _decide(
        self, restarts: Mapping[int, m.Restart], nodes: list[int], carrier: Mapping[str, str]
    ) -> None:
        """With a store: write the decision fenced before any node hears of it."""
        if self.ctx.seat is None or not nodes:
            return
        one = restarts[nodes[0]]
        await self.ctx.seat.decide(
            generation=one.generation,
            step=one.step,
            port=one.master_port,
            attempt=one.attempt,
            nodes=nodes,
            trigger=one.trigger,
            fetch={node: restart.fetch for node, restart in restarts.items()},
            rewinds=one.rewinds,
            trace=carrier,
        )

    async def _fence(self, write: Callable[[], Awaitable[None]]) -> None:
        """Run a fenced write: a deposed coordinator (its seat lost: frozen or cut off for
        longer than its lease) acts on nothing; an unreachable store is waited for (with
        backoff, up to ``cluster.rejoin_timeout``) before the attempt fails, so an etcd outage
        does not spend the recovery's attempts."""
        cluster = self.ctx.policy.cluster
        deadline = trio.current_time() + cluster.rejoin_timeout
        delay = cluster.heartbeat_interval
        said = False
        while True:
            try:
                await write()
                return
            except (FencedWriteRefused, LookupError) as exc:
                raise _Deposed(str(exc)) from None
            except StoreUnavailable as exc:
                if trio.current_time() + delay > deadline:
                    raise AttemptFailed(f"the store did not take the decision: {exc}") from None
                if not said:
                    log.warning("store unreachable: the recovery waits for it", error=str(exc))
                    said = True
            await trio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def _wait_for_nodes(self, recovery: RecoveryTrace | None) -> None:
        missing = self._missing()
        if not missing:
            return
        timeout = self.ctx.policy.cluster.rejoin_timeout
        log.warning("waiting for nodes to come back", missing=missing, timeout=timeout)
        if recovery is not None:
            recovery.event("waiting_for_nodes", reason=",".join(map(str, missing)))
        with trio.move_on_after(timeout):
            while self._missing():
                self._membership_changed = trio.Event()
                await self._membership_changed.wait()
            return
        raise _GiveUp(
            f"node(s) {', '.join(map(str, self._missing()))} did not come back within "
            f"{timeout:g} s (cluster.rejoin_timeout)"
        )

    async def _prepare_all(self, gen: int, carrier: dict[str, str]) -> dict[int, m.Holding]:
        replies: dict[int, m.Holding] = {}
        errors: list[str] = []
        # A live node answers once its workers stopped; a dead one is declared lost by then.
        timeout = self.ctx.config.worker_shutdown + self.ctx.policy.cluster.peer_timeout + 5.0

        async def one(node: int) -> None:
            try:
                if node == self.rank:
                    replies[node] = await self.node.prepare(gen)
                    return
                reply = await self._ask(node, m.Prepare(gen), carrier, timeout, m.Holding)
                replies[node] = reply.body
            except Exception as exc:
                errors.append(f"node {node}: {type(exc).__name__}: {exc}")

        async with trio.open_nursery() as nursery:
            for node in range(self.n_nodes):
                if node not in self.node.finished_nodes:
                    nursery.start_soon(one, node)
        if errors:
            raise AttemptFailed("prepare failed: " + "; ".join(errors))
        return replies

    def _select(
        self,
        holdings: Mapping[int, Holdings],
        version: int | None,
        *,
        manual: bool = False,
        recovering: bool = False,
    ) -> Selection | None:
        """The version to restart at; None: a start from scratch (nothing held anywhere, or
        ``recovery.on_no_snapshot = "restart"``). A recovery that would throw away progress
        under ``on_no_snapshot = "stop"`` gives up instead (`_GiveUp`)."""
        policy = self.ctx.policy
        config = self.ctx.config
        owner = {r: r // config.nproc_per_node for r in range(config.world_size)}
        checkpoint = policy.recovery.checkpoint
        wanted = policy.recovery.version if checkpoint == "specific" else None
        if version is not None and version >= 0:
            checkpoint, wanted = "specific", version
        try:
            return select(
                holdings,
                world_size=config.world_size,
                owner=owner,
                checkpoint=checkpoint,
                version=wanted,
                best_metric=policy.retention.best_metric,
                best_mode=policy.retention.best_mode,
                rewinds=self.node.rewinds,
            )
        except NoVersion as exc:
            if manual:
                raise
            if version is not None and version >= 0:
                # A manual request checked before the workers stopped, gone since (retention
                # moved on meanwhile): restart by the policy's rule rather than not at all.
                log.error(
                    "requested version no longer held; restarting by the policy's rule",
                    version=version,
                    reason=str(exc),
                )
                return self._select(holdings, None, recovering=recovering)
            if checkpoint == "specific":
                raise _GiveUp(f"cannot restart at the requested version: {exc}") from None
            if any(not h.empty for h in holdings.values()):
                lost = _lost_progress(holdings, exc)
                if recovering and policy.recovery.on_no_snapshot == "stop":
                    raise _GiveUp(
                        f'{lost}; recovery.on_no_snapshot = "stop" (set "restart" to '
                        "start over from step 0)"
                    ) from None
                log.error(
                    "no usable snapshot: starting from scratch",
                    reason=lost,
                    on_no_snapshot=policy.recovery.on_no_snapshot,
                )
            else:
                log.info("no snapshot held anywhere: starting from scratch")
            return None

    async def _deliver(self, node: int, restart: m.Restart, carrier: dict[str, str]) -> None:
        if node == self.rank:
            self.node.accept_restart(restart, carrier)
            return
        try:
            await self._ask(node, restart, carrier, 10.0, None)
        except Exception as exc:
            if self.ctx.seat is not None:  # it restarts from the store's decision all the same
                log.warning("restart message not delivered", node=node, error=str(exc))
                return
            raise AttemptFailed(f"node {node} did not accept the restart: {exc}") from exc

    async def _ask(
        self,
        node: int,
        message: object,
        carrier: dict[str, str],
        timeout: float,  # noqa: ASYNC109 (per request)
        expect: type[Any] | None,
    ) -> Incoming[Any]:
        """A request to ``node``, asked again every heartbeat interval for up to
        ``cluster.peer_timeout`` while the node refuses it because it does not see this node
        as the coordinator yet: views converge within that time (a leader's key reaching it,
        a lower peer declared lost, a rejoined peer's state), and a refusal in that moment
        must not cost a recovery attempt. A node whose agent is still starting (no handler
        yet) is asked again within milliseconds."""
        cluster = self.ctx.policy.cluster
        deadline = trio.current_time() + cluster.peer_timeout
        while True:
            try:
                return await self.ctx.transport.request(
                    node, message, trace=carrier, timeout=timeout, expect=expect
                )
            except RemoteError as exc:
                starting = _NO_HANDLER in exc.reason  # a new agent, its executor not up yet
                if (
                    m.NOT_COORDINATOR not in exc.reason and not starting
                ) or trio.current_time() >= deadline:
                    raise
                log.info(
                    "that node is starting"
                    if starting
                    else "not the coordinator in that node's view yet",
                    node=node,
                    reason=exc.reason,
                )
                if starting:
                    await trio.sleep(_STARTING_RETRY)
                    continue
            await trio.sleep(cluster.heartbeat_interval)

    async def _await_resumed(
        self, gen: int, nodes: list[int], recovery: RecoveryTrace | None
    ) -> None:
        r = self.ctx.policy.recovery
        budget = 2 * r.startup_timeout + 60.0
        restored: set[int] = set()
        resumed: set[int] = set()
        with trio.move_on_after(budget) as scope:
            while resumed < set(nodes):
                message, _trace = await self._inbox.receive()
                if isinstance(message, m.Progress) and message.generation == gen:
                    if message.phase == RestartProgress.FAILED:
                        raise AttemptFailed(f"node {message.node}: {message.detail}")
                    if message.phase == RestartProgress.RESTORED:
                        restored.add(message.node)
                        if restored >= set(nodes) and recovery is not None:
                            recovery.event(RecoveryEvent.RESTORED)
                    elif message.phase == RestartProgress.RESUMED:
                        resumed.add(message.node)
                elif isinstance(message, m.Failure) and message.generation >= gen:
                    if message.evidence.get("stop"):
                        raise _GiveUp(f"recovery.on_nan = stop: {_describe(message)}")
                    raise AttemptFailed(f"{message.trigger} on node {message.node}", message)
                elif (
                    isinstance(message, PeerLost)
                    and message.rank in nodes
                    and not self.ctx.membership.is_alive(message.rank)  # not since replaced
                ):
                    raise AttemptFailed(f"node {message.rank} lost during the restart")
                elif isinstance(message, _Manual):
                    log.warning("manual recovery ignored: a restart is in progress")
        if scope.cancelled_caught:
            raise AttemptFailed(
                f"nodes {sorted(set(nodes) - resumed)} did not resume within {budget:g} s"
            )

    # -- ending ----------------------------------------------------------------------------

    def _stop(self, reason: str) -> None:
        """Every node gives up (this one last)."""
        for node in range(self.n_nodes):
            if node != self.rank and node not in self.node.finished_nodes:
                try:
                    self.ctx.transport.try_send(node, m.GiveUp(reason, EXIT_GAVE_UP))
                except Exception as exc:
                    log.warning("give-up not delivered", node=node, error=str(exc))
        self.node.give_up(reason, EXIT_GAVE_UP)

    def _callback(self, path: str, trigger: Trigger, outcome: Outcome, detail: str) -> None:
        """Run a policy callback (``on_recovery`` / ``on_failure``) off the hot path."""
        if not path:
            return
        info = {
            "node": self.rank,
            "trigger": trigger.value,
            "outcome": outcome.value,
            "detail": detail,
            "generation": self.node.known_generation(),
        }
        if self._callbacks is not None:
            self._callbacks.start_soon(_run_callback, path, info)


class _Deposed(Exception):
    """This node lost the coordinator's seat: its decision was refused; another leads."""


class _GiveUp(Exception):
    """Recovery cannot succeed whatever we retry."""


async def _run_callback(path: str, info: dict[str, Any]) -> None:
    try:
        fn = _resolve(path)
        await trio.to_thread.run_sync(fn, info)
    except Exception:
        log.exception("policy callback failed", callback=path)


def _resolve(path: str) -> Callable[[dict[str, Any]], Any]:
    module, _, name = path.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{path} is not callable")
    return target  # type: ignore[no-any-return]


def _lost_progress(holdings: Mapping[int, Holdings], exc: NoVersion) -> str:
    """What a start from scratch would throw away: the newest step any node still holds."""
    steps = [
        v.step
        for h in holdings.values()
        for held in (h.ram, h.disk)
        for infos in held.values()
        for v in infos
    ]
    newest = max(steps, default=0)
    return f"no usable snapshot ({exc}): training up to step {newest} would be lost"


def _source_summary(selection: Selection) -> str:
    return slowest_source(o.source for o in selection.origins.values())


def _describe(failure: m.Failure) -> str:
    return f"node {failure.node}: {failure.trigger} {_short(failure.evidence)}"


def _short(evidence: Mapping[str, Any]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in evidence.items())
    return text[:300]
