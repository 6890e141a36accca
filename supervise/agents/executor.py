"""Executor: this node's side of every (re)start, and the coordinator's role when it falls here.

A node's life: *joining* (no workers yet) -> *starting* (a Restart arrived: fetch what is
missing, point every local rank's restore at the chosen version, spawn the workers, watch them
restore and take their first step) -> *running* -> on a failure anywhere, *recovering*
(Prepare: workers stopped, holdings reported) -> *starting* ... until *finished* (every local
worker exited 0) or *gave_up* (the coordinator's GiveUp).

Failures seen here (a worker's exit, the Monitor's hang or NaN, a corrupt shard) are reported
to the coordinator with their evidence; the coordinator decides (see `coordinator`). The
restart itself is `restart.LocalRestart`; the coordinator is reached through `roles`. With
``--store``, a follower restarts from the decision it reads in the store (`follower`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
import trio

from supervise.agents import messages as m
from supervise.agents._tracing import joined
from supervise.agents.context import NodeContext
from supervise.agents.follower import DecisionFollower
from supervise.agents.lifecycle import Ended, ExecutorState, RestartProgress
from supervise.agents.monitor import Detection
from supervise.agents.restart import LocalRestart
from supervise.agents.roles import Coordinating
from supervise.agents.workers import SparePool, free_port
from supervise.cluster import DEFERRED, Incoming
from supervise.cluster.failure_detector import Event, PeerBack, PeerLost
from supervise.runtime import ExitKind, ExitReason, guard_pid
from supervise.snapshot import protocol as p
from supervise.telemetry import Trigger

log = structlog.get_logger("supervise.agents.executor")


class Executor:
    """The node's restarts, worker lifecycle and failure reports."""

    def __init__(self, ctx: NodeContext, *, generation: int = 0) -> None:
        self.ctx = ctx
        self.rank = ctx.config.rank
        self.state = ExecutorState.JOINING
        self.generation = generation  # the previous incarnation's, when this one restarts
        self.coordinator: Coordinating | None = None  # attached by the node
        # spares started before this executor (a standby's warm ones); None: its own pool
        self.spares: SparePool | None = None
        self.finished_nodes: set[int] = set()
        self.rewinds: list[tuple[int, int]] = []
        self._local: LocalRestart | None = None  # made by run()
        self._nursery: trio.Nursery | None = None
        self._restart_scope: trio.CancelScope | None = None
        # (generation, node running its restart); node -1 once that node's process is gone
        self._leader: tuple[int, int] = (-1, -1)
        # (generation, node whose Prepare this node accepted for it): the node running a
        # restart may finish it (restart, give_up, its next attempt) once a lower node rejoins
        self._preparer: tuple[int, int] = (-1, -1)
        self._recovering = False  # a `supervise recover` request is being answered
        self._reported: set[int] = set()
        self._unresolved: m.Failure | None = None  # this node's last report (--store: resent)
        self._handed_over: m.Failure | None = None  # a deposed recovery's trigger (resent)
        self._prepared = -1  # the generation of the last Prepare answered
        # --store: restarts come from the store's decisions (a restart message is a nudge)
        self._follower: DecisionFollower | None = None  # made by run()
        self._done_ranks: set[int] = set()
        self._done = trio.Event()
        self._ended: Ended | None = None

    # -- queries ---------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What this node tells its peers in every heartbeat."""
        return {m.INFO_GENERATION: self.generation, m.INFO_STATE: self.state.value}

    def coordinator_rank(self) -> int:
        """The elected coordinator with ``--store etcd://...`` (once known); else the lowest
        live rank that is not joining, the lowest live rank when all are.

        The node that led this node's current generation counts as established even while
        its last heartbeat still says joining (right after a start it has not beaten since),
        so a failure in the first moments of a generation goes to the node that started it.
        """
        seat = self.ctx.seat
        leader = None if seat is None else seat.leader_rank()
        if leader is not None:
            return leader  # --store etcd://...: the elected coordinator
        live = [r for r in self.ctx.membership.live() if r not in self.finished_nodes]
        return self._coordinator_among(live)

    def _coordinator_among(self, live: list[int], unheard: int | None = None) -> int:
        if not live:
            return self.rank
        gen, leader = self._leader
        led = leader if gen == self.generation else None
        established = [
            r
            for r in live
            if r in (led, unheard) or self._state_of(r) not in (ExecutorState.JOINING, None)
        ]
        return min(established) if established else min(live)

    def may_coordinate(self, sender: int | None) -> str | None:
        """None when ``sender`` may send this node coordinator messages (prepare, restart,
        give_up), else why not. With a store: the elected leader as this node knows it (any
        sender while none is known: a leader's decisions are fenced in the store). Else the
        coordinator by this node's view, not counting lower peers silent for half the peer
        timeout (the coordinator may have declared them lost a moment before this node does);
        a node that is joining takes a sender it has not heard a heartbeat from yet as
        established (a replacement node's first prepare may come before the coordinator's
        first heartbeat). Without a store, the node running this node's current restart (its
        Prepare or Restart accepted) may also go on: a lower node that rejoined during the
        restart becomes the coordinator by the view before that restart is done."""
        if sender is None:
            return "a client sends no prepare, restart or give_up"
        seat = self.ctx.seat
        if seat is not None:  # --store etcd://...: the elected leader, whose writes are fenced
            leader = seat.leader_rank()
            if sender == self.rank or (leader is not None and sender != leader):
                return f"node {sender} {m.NOT_COORDINATOR} (node {leader} is elected)"
            return None
        if sender != self.rank and sender in self._driving():
            return None  # it runs this node's current restart: it finishes what it began
        ms = self.ctx.membership
        grace = self.ctx.policy.cluster.peer_timeout / 2
        live = [
            r
            for r in ms.live()
            if r not in self.finished_nodes and (r in (sender, self.rank) or ms.silence(r) < grace)
        ]
        joining = self.state is ExecutorState.JOINING and ms.peer_info(sender) is None
        expected = self._coordinator_among(live, sender if joining else None)
        if sender != expected or sender == self.rank:
            return f"node {sender} {m.NOT_COORDINATOR} (node {expected} is)"
        return None

    def _driving(self) -> tuple[int, ...]:
        """The nodes running this node's current generation's restart: the one whose Prepare
        it accepted and the one whose Restart it accepted (once a lower node rejoins, the view
        names that one as the coordinator while the restart under way is not done)."""
        return tuple(
            node
            for gen, node in (self._preparer, self._leader)
            if gen == self.generation and node >= 0
        )

    def _from_coordinator(self, _body: object, sender: int | None) -> str | None:
        return self.may_coordinate(sender)

    def _speaks_for_itself(
        self, body: m.Failure | m.Progress | m.Finished, sender: int | None
    ) -> str | None:
        """None when a report about ``body.node`` comes from that node itself."""
        if sender is None or body.node != sender:
            who = "a client" if sender is None else f"node {sender}"
            return f"{who} reported for node {body.node}: a node reports only for itself"
        return None

    def _state_of(self, rank: int) -> str | None:
        if rank == self.rank:
            return self.state
        info = self.ctx.membership.peer_info(rank)
        return None if info is None else str(info.get(m.INFO_STATE))

    def known_generation(self) -> int:
        """The highest generation this node has heard of (its own, its peers')."""
        gens = [self.generation]
        for r in self.ctx.membership.live():
            info = self.ctx.membership.peer_info(r) if r != self.rank else None
            if info is not None and isinstance(info.get(m.INFO_GENERATION), int):
                gens.append(int(info[m.INFO_GENERATION]))
        return max(gens)

    def status(self) -> m.Status:
        held = self.ctx.holdings()
        live = self.ctx.membership.live()
        local = self._local
        monitor = self.ctx.monitor()
        beats = [b.to_wire() for b in monitor.beats()] if monitor is not None else []
        return m.Status(
            node=self.rank,
            state=self.state.value,
            generation=self.generation,
            coordinator=self.coordinator_rank(),
            live=list(live),
            ranks=list(self.ctx.config.ranks),
            ram=m.entries(held.ram),
            disk=m.entries(held.disk),
            workers=self._worker_status(),
            spares=local.spare_pids if local is not None else [],
            pid=os.getpid(),
            guard=guard_pid() or 0,
            beats=beats,
            replica_lag=sorted(self.ctx.keeper.lag().items()),
            recoverable=-1 if (point := self.ctx.keeper.recoverable) is None else point[1],
        )

    def _worker_status(self) -> list[m.WorkerStatus]:
        """Each local rank's worker process (this generation's) and its progress."""
        group = self._local.workers if self._local is not None else None
        monitor = self.ctx.monitor()
        progress = monitor.progress() if monitor is not None else {}
        out = []
        for rank in self.ctx.config.ranks:
            handle = group.handles.get(rank) if group is not None else None
            seen = progress.get(rank)
            out.append(
                m.WorkerStatus(
                    rank=rank,
                    pid=handle.pid if handle is not None else 0,
                    spare=group is not None and rank in group.warm,
                    alive=handle is not None and group is not None and rank not in group.exits,
                    last_step=seen.step if seen is not None else None,
                    step_age=seen.step_age if seen is not None else None,
                    running_for=seen.running_for if seen is not None else None,
                )
            )
        return out

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> Ended:
        """Serve restarts until this node finished or gave up; returns how it ended."""
        ctx = self.ctx
        config = ctx.config
        transport = ctx.transport
        # who may send what: the coordinator drives restarts; a node reports for itself;
        # `supervise status` / `recover` (a client, with a key when CURVE is on) may ask
        coordinator = self._from_coordinator
        itself = self._speaks_for_itself
        routes: list[tuple[type[Any], Callable[[Incoming[Any]], Any], Any]] = [
            (m.Prepare, self._on_prepare, coordinator),
            (m.Restart, self._on_restart, coordinator),
            (m.GiveUp, self._on_give_up, coordinator),
            (m.Finished, self._on_finished, itself),
            (m.StatusQuery, self._on_status, None),
            (m.Recover, self._on_recover, None),
            (m.Failure, self._on_failure, itself),
            (m.Progress, self._on_progress, itself),
            (m.StandbyHello, self._on_standby_hello, None),  # a standby is a client till then
            (m.RankMoved, self._on_rank_moved, coordinator),
        ]
        for kind, handler, allow in routes:
            transport.handle(kind, handler, allow=allow)
        spares = self.spares or SparePool(
            config.command,
            ctx.policy.recovery.preload,
            ctx.run_dir,
            env=config.env,
            cwd=config.cwd,
            shutdown=config.worker_shutdown,
            fork_server=ctx.policy.recovery.fork_server,
        )
        self._local = LocalRestart(
            ctx, spares=spares, on_exit=self._worker_exited, report=self._restart_progress
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                events = ctx.membership.subscribe()
                nursery.start_soon(self._membership_events, events)
                if self.coordinator is not None:
                    await nursery.start(self.coordinator.run)
                nursery.start_soon(self._fill_spares)
                if ctx.seat is not None:
                    nursery.start_soon(self._resend_unresolved)
                    self._follower = DecisionFollower(
                        self.rank, ctx.seat, self._restart_by, lambda: self._prepared
                    )
                    ctx.seat.on_decision = self._follower.on_store
                task_status.started()
                await self._done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if ctx.seat is not None:
                ctx.seat.on_decision = None
            for kind, handler, _ in routes:
                transport.unhandle(kind, handler)
            with trio.CancelScope(shield=True):
                await self._stop_workers()
        assert self._ended is not None  # _done is set only with it
        return self._ended

    async def _membership_events(self, events: trio.MemoryReceiveChannel[Event]) -> None:
        async for ev in events:
            if (
                isinstance(ev, PeerLost | PeerBack)
                and ev.rank == self._leader[1]
                and (isinstance(ev, PeerLost) or ev.restarted)
            ):
                # The process that led this generation is gone (a replacement leads nothing
                # before it joins): coordination and progress go by membership again.
                self._leader = (self._leader[0], -1)
            if (
                isinstance(ev, PeerLost | PeerBack)
                and ev.rank == self._preparer[1]
                and (isinstance(ev, PeerLost) or ev.restarted)
            ):
                self._preparer = (self._preparer[0], -1)  # (as the leader above)
            if self.coordinator is not None:
                self.coordinator.membership_event(ev)
            if isinstance(ev, PeerLost | PeerBack):
                log.info("membership changed", change=ev.kind, peer=ev.rank)

    # -- local detections ------------------------------------------------------------------

    def detected(self, d: Detection) -> None:
        """A failure seen on this node (Monitor, worker exit, corrupt shard): tell the
        coordinator once per generation."""
        if (
            self.state not in (ExecutorState.RUNNING, ExecutorState.STARTING)
            or self.generation in self._reported
        ):
            log.debug("detection ignored", trigger=d.trigger.value, state=self.state.value)
            return
        self._reported.add(self.generation)
        evidence = dict(d.evidence)
        if d.stop:
            evidence["stop"] = True
        failure = m.Failure(
            self.rank, self.generation, d.trigger.value, d.since, d.detected, evidence
        )
        self._unresolved = failure
        self.send_to_coordinator(failure)

    def hand_over(self, trigger: str, since: float, evidence: Mapping[str, Any]) -> None:
        """A recovery (or the start) this node coordinated was deposed, maybe after it
        prepared nodes (their workers stopped, their generation raised): only a recovery
        restarts them, and the reports of the generation before are stale to the new
        coordinator. So report the trigger at the newest generation this node knows of until
        a restart moves this node past it (`_resend_unresolved`)."""
        generation = self.known_generation()
        failure = m.Failure(self.rank, generation, trigger, since, time.time(), dict(evidence))
        self._handed_over = failure
        log.info("recovery handed over", generation=failure.generation, trigger=trigger)
        self.send_to_coordinator(failure)

    async def _resend_unresolved(self) -> None:
        """With ``--store``: a report sent while no coordinator was elected (or to one deposed
        since) would be lost; send it again every ``cluster.peer_timeout`` until a restart
        moves this node past its generation (the coordinator drops what it already handled).
        A deposed recovery's trigger (`hand_over`) goes again whatever this node's state."""
        period = self.ctx.policy.cluster.peer_timeout
        while True:
            await trio.sleep(period)
            handed = self._handed_over
            if handed is not None and self.generation <= handed.generation:
                if not self.state.ended:
                    log.info("handed-over recovery reported again", generation=handed.generation)
                    self.send_to_coordinator(handed)
                continue
            failure = self._unresolved
            if failure is None or failure.generation != self.generation or self.state.ended:
                continue
            if self.state not in (ExecutorState.RUNNING, ExecutorState.STARTING):
                continue  # a restart is under way: the report was heard
            log.info("failure reported again", generation=failure.generation)
            self.send_to_coordinator(failure)

    def send_to_coordinator(self, message: object) -> None:
        """Deliver ``message`` to the coordinator (this node included), in the background."""
        target = self.coordinator_rank()
        if target == self.rank:
            if self.coordinator is not None:
                self.coordinator.receive(message, {})
            return
        if self._nursery is None:
            return
        self._nursery.start_soon(self._send, target, message)

    async def _send(self, peer: int, message: object) -> None:
        try:
            await self.ctx.transport.send(peer, message, timeout=5.0)
        except Exception as exc:
            log.warning("message to the coordinator lost", peer=peer, error=str(exc))

    def _worker_exited(self, rank: int, pid: int, reason: ExitReason) -> None:
        monitor = self.ctx.monitor()
        if monitor is not None:
            monitor.disarm(rank)
        group = self._local.workers if self._local is not None else None
        if group is None or group.stopping:
            return
        if reason.kind is ExitKind.NORMAL:
            self._done_ranks.add(rank)
            log.info("worker finished", rank=rank, pid=pid)
            if self._done_ranks >= set(self.ctx.config.ranks):
                self._node_finished()
            return
        now = time.time()
        evidence = {
            "rank": rank,
            "pid": pid,
            "exit_code": reason.exit_code,
            "signal": reason.signal,
            "reason": str(reason),
        }
        self.detected(Detection(Trigger.WORKER_EXIT, now, now, evidence))

    def corrupt(self, rank: int, step: int, reason: str) -> None:
        """The arena service's corrupt hook: a worker found a shard that fails its checksum."""
        now = time.time()
        evidence = {"rank": rank, "version": step, "reason": reason}
        self.detected(Detection(Trigger.CHECKSUM, now, now, evidence))

    def local_request(self, req: p.Request) -> None:
        """The arena service's request hook: the restart follows its workers' progress."""
        if self._local is not None:
            self._local.local_request(req)

    def _node_finished(self) -> None:
        log.info("training finished on this node", node=self.rank, generation=self.generation)
        self.state = ExecutorState.FINISHED
        for peer in self.ctx.membership.peers:
            with contextlib.suppress(Exception):
                self.ctx.transport.try_send(peer, m.Finished(self.rank, self.generation))
        self._ended = Ended(exit_code=0)
        self._done.set()

    # -- coordinator -> node ---------------------------------------------------------------

    async def _on_prepare(self, msg: Incoming[m.Prepare]) -> object:
        gen = msg.body.generation
        if gen < self.generation:
            raise ValueError(f"prepare for generation {gen}, this node is at {self.generation}")
        assert self._nursery is not None
        if msg.sender is not None:
            self._preparer = (gen, msg.sender)
        self._nursery.start_soon(self._prepare, msg)
        return DEFERRED

    async def prepare(self, generation: int) -> m.Holding:
        """Stop the workers for a restart at ``generation``; say what this node holds."""
        if self._restart_scope is not None:
            self._restart_scope.cancel()
        self.generation = max(self.generation, generation)
        self._prepared = generation
        if not self.state.ended and self.state is not ExecutorState.JOINING:
            self.state = ExecutorState.RECOVERING
        await self._stop_workers()
        config = self.ctx.config
        port = free_port(config.master_addr) if config.hosts_rank_zero else 0
        return m.Holding.of(self.ctx.holdings(), port)

    async def _prepare(self, msg: Incoming[m.Prepare]) -> None:
        follower = self._follower
        if follower is not None and not await follower.backs_prepare(
            msg.body.generation, msg.sender
        ):
            return  # --store: not claimed in the store by that coordinator: nothing stops
        with joined(msg.trace, self.rank):  # stopping the workers is part of the recovery
            holding = await self.prepare(msg.body.generation)
        await self.ctx.transport.reply(msg, holding)

    async def _on_restart(self, msg: Incoming[m.Restart]) -> object:
        if self._follower is not None and self._nursery is not None:
            # --store: the message only says "read the store now"; the store's decision,
            # under the current leader's fence, is what this node restarts by
            self._nursery.start_soon(self._follower.nudge, msg.body, msg.sender)
        else:
            self.accept_restart(msg.body, msg.trace, leader=msg.sender)
        return m.Progress(self.rank, msg.body.generation, RestartProgress.ACCEPTED.value)

    def _restart_by(self, restart: m.Restart, trace: Mapping[str, str], leader: int) -> None:
        """A restart the store decided (``--store``): begun when this node still runs."""
        if self._nursery is None or self.state.ended:
            return
        self.accept_restart(restart, trace, leader=leader)

    def accept_restart(
        self, restart: m.Restart, trace: Mapping[str, str], *, leader: int | None = None
    ) -> None:
        """Begin a restart in the background (the coordinator's own node calls this too).
        Its progress goes to ``leader``, the node running that attempt (default: this one)."""
        if restart.generation < self.generation:
            raise ValueError(
                f"restart at generation {restart.generation}, this node is at {self.generation}"
            )
        self._leader = (restart.generation, self.rank if leader is None else leader)
        if self._restart_scope is not None:
            self._restart_scope.cancel()
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._restart_scope = scope
        self._nursery.start_soon(self._restart, restart, dict(trace), scope)

    async def _restart(
        self, msg: m.Restart, trace: dict[str, str], scope: trio.CancelScope
    ) -> None:
        with scope:
            try:
                await self._do_restart(msg, trace)
            except Exception as exc:
                log.exception("restart failed", generation=msg.generation)
                self._progress(
                    msg.generation, RestartProgress.FAILED, detail=f"{type(exc).__name__}: {exc}"
                )

    async def _do_restart(self, msg: m.Restart, trace: dict[str, str]) -> None:
        self.generation = msg.generation
        self.state = ExecutorState.STARTING
        self.rewinds = list(msg.rewinds)
        self._done_ranks.clear()
        assert self._nursery is not None and self._local is not None
        await self._local.run(msg, trace, self._nursery)
        if self._nursery is not None:
            self._nursery.start_soon(self._fill_spares)  # for the next restart

    async def _fill_spares(self) -> None:
        """Keep one spare per local worker waiting (off the restart's critical path)."""
        if self._nursery is not None and self._local is not None and not self.state.ended:
            await self._local.fill_spares(self._nursery)

    def _restart_progress(
        self, generation: int, phase: RestartProgress, *, nbytes: int = 0, source: str = ""
    ) -> None:
        """The restart's progress; a node whose every worker stepped again is running."""
        if phase is RestartProgress.RESUMED:
            self.state = ExecutorState.RUNNING
        self._progress(generation, phase, nbytes=nbytes, source=source)

    def _progress(
        self,
        generation: int,
        phase: RestartProgress,
        *,
        detail: str = "",
        nbytes: int = 0,
        source: str = "",
    ) -> None:
        progress = m.Progress(self.rank, generation, phase.value, detail, nbytes, source)
        gen, leader = self._leader
        if gen != generation or leader < 0:
            self.send_to_coordinator(progress)
        elif leader == self.rank:
            if self.coordinator is not None:
                self.coordinator.receive(progress, {})
        elif self._nursery is not None:
            self._nursery.start_soon(self._send, leader, progress)  # the node awaiting it

    async def _on_give_up(self, msg: Incoming[m.GiveUp]) -> None:
        self.give_up(msg.body.reason, msg.body.exit_code)

    def give_up(self, reason: str, exit_code: int) -> None:
        """Stop for good (the coordinator decided): workers stopped, the node exits."""
        log.error("giving up", reason=reason, exit_code=exit_code)
        self.state = ExecutorState.GAVE_UP
        self._ended = Ended(exit_code)
        if self._restart_scope is not None:
            self._restart_scope.cancel()
        self._done.set()

    async def _on_finished(self, msg: Incoming[m.Finished]) -> None:
        self.finished_nodes.add(msg.body.node)

    async def _on_standby_hello(self, msg: Incoming[m.StandbyHello]) -> object:
        if self.coordinator is None:
            return m.StandbyOrder(-1)
        return self.coordinator.standby_hello(msg.body)

    async def _on_rank_moved(self, msg: Incoming[m.RankMoved]) -> None:
        """A standby took over a lost node: talk to that rank at its endpoint from now on."""
        if msg.body.rank != self.rank:
            self.ctx.transport.set_peer(msg.body.rank, msg.body.endpoint)
            log.info("node moved to a standby", node=msg.body.rank, endpoint=msg.body.endpoint)

    async def _on_status(self, msg: Incoming[m.StatusQuery]) -> object:
        return self.status()

    async def _on_recover(self, msg: Incoming[m.Recover]) -> object:
        """Answered from a task of its own: forwarding to the coordinator and its check of
        every node's holdings take seconds, and the transport's reader (heartbeats
        included) must not wait for them. One request at a time; another is declined."""
        if self._recovering or self._nursery is None:
            return m.RecoverReply(False, f"node {self.rank} is handling a recovery request")
        self._recovering = True
        self._nursery.start_soon(self._answer_recover, msg)
        return DEFERRED

    async def _answer_recover(self, msg: Incoming[m.Recover]) -> None:
        try:
            try:
                reply = await self._recover(msg)
            except Exception as exc:
                reply = m.RecoverReply(False, f"{type(exc).__name__}: {exc}")
            if msg.request_id:  # a one-way recover (a client's send) gets no answer
                await self.ctx.transport.reply(msg, reply)
        finally:
            self._recovering = False

    async def _recover(self, msg: Incoming[m.Recover]) -> m.RecoverReply:
        target = self.coordinator_rank()
        if target != self.rank:
            reply = await self.ctx.transport.request(
                target, msg.body, trace=msg.trace, timeout=30.0, expect=m.RecoverReply
            )
            body: m.RecoverReply = reply.body
            return body
        if self.coordinator is None:
            return m.RecoverReply(False, f"node {self.rank} runs no coordinator")
        try:
            detail = await self.coordinator.manual(msg.body.version, dict(msg.trace))
        except ValueError as exc:
            log.warning("manual recovery refused", reason=str(exc))
            return m.RecoverReply(False, str(exc))
        return m.RecoverReply(True, detail)

    async def _on_failure(self, msg: Incoming[m.Failure]) -> None:
        if self.coordinator is not None:
            self.coordinator.receive(msg.body, dict(msg.trace))

    async def _on_progress(self, msg: Incoming[m.Progress]) -> None:
        if self.coordinator is not None:
            self.coordinator.receive(msg.body, dict(msg.trace))

    async def _stop_workers(self) -> None:
        if self._local is not None:
            await self._local.stop_workers()
