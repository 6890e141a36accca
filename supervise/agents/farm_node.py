"""The farm node: what a node agent run with ``--tasks`` does with the tasks assigned to it.

On ``farm.assign`` it runs the attempt in a worker process under the agent (a crashing task
is an attempt's end, never the agent's), against the task's journal in the agent's arenas
(`ArenaService`, one shard per task, served to the worker on a local endpoint with a token for
that shard and attempt). Each committed journal version is pushed to the node's group peers
(``farm.journal``, fenced), so after a loss of this whole node the task resumes on another node
from the replica in its RAM, or fetched (``farm.journal_fetch``) from the ranks the assignment
names. The node offers its capacity (``farm.offer``), reports phases and throttled progress
(``farm.update``), renews its leases every ``lease_s / 3`` (``farm.renew``, each renewal on
its own so a slow answer never delays the next; also with nothing held, the node's sign of
life; it names the attempts it ended without a report, so they move at once; an attempt the
reply names stale is killed at once), and pauses (checkpoint, then
stop) or cancels on ``farm.stop``.

Fencing: every attempt carries the fence of its assignment; the agent refuses a worker's
commit while the attempt's lease has lapsed (not renewed for ``lease_s``: it may have moved;
the commit first waits up to a lease for a renewal, since a renewal may merely be late)
or once it is known stale, and group peers refuse journal versions older than the newest
fence they know, so a zombie attempt (its node frozen past its lease) commits nowhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import msgpack
import structlog
import trio

from supervise.agents._tracing import maybe_phase
from supervise.agents.context import NodeContext
from supervise.agents.farm_attempt import (
    AttemptRunner,
    Running,
    WorkerRunner,
    end_phase,
    pool_env,
)
from supervise.agents.farm_journals import REQUEST_TIMEOUT_S, JournalPeers, Wire
from supervise.cluster.errors import ClusterError
from supervise.cluster.ipc import ipc_endpoint, serve_deferred
from supervise.cluster.placement import place
from supervise.snapshot import protocol as p
from supervise.snapshot.errors import SnapshotError
from supervise.snapshot.service import ArenaService, CommitEvent
from supervise.tasks.arena_journal import unpack
from supervise.tasks.control import INLINE_BYTES, TASK_ID_ATTR
from supervise.tasks.farm_messages import (
    MAX_ERROR_CHARS,
    STALE_FENCE,
    Ack,
    Assign,
    AttemptPhase,
    Offer,
    Renew,
    Renewed,
    Stop,
    StopWhy,
    Update,
)
from supervise.tasks.host import JournalHost
from supervise.tasks.journal_replica import (
    Replica,
    verified,
)
from supervise.tasks.pool import PoolSettings, TaskPool
from supervise.tasks.spec import TaskSpec
from supervise.tasks.telemetry import attempt_span
from supervise.telemetry import Phase, RecoveryTrace, Source

log = structlog.get_logger("supervise.agents.farm_node")

QUIET_START_S = 0.2
"""An attempt (not a resumed one) is reported started this long after its worker took it, and
the commit holding its outcome is not reported as progress: a tiny task reports only its end
(each report is a table change the coordinator saves on every farm node)."""
TASK_SHARD_BASE = 50_000
"""Task journals are shards ``TASK_SHARD_BASE + n`` of the agent's arenas (training ranks are
below; arena file names hold five digits). A shard given back when its task ended is used
again: the cap bounds the journals held at once, not the tasks a node runs in its life."""
_SHARD_LIMIT = 100_000
PROGRESS_EVERY_S = 0.5
"""Progress updates to the coordinator at most this often per attempt."""
STEPS_ATTR = "supervise.task.resumed_steps"  # committed steps a resumed attempt starts with
LAPSED = "lease lapsed"
FINAL_UPDATE_TIMEOUT_S = 10.0
"""Deadline of an attempt's final report: the coordinator answers it once the table change is
held by a peer (or the store), which under load takes longer than a plain request."""
RENEW_INLINE = 256
"""Attempts named in a renewal's header; more travel as its payload (a packed list)."""
RENEWALS_IN_FLIGHT = 4
"""Renewals awaiting their answer at once (each is sent on its own, never behind another)."""
_DONE = frozenset({AttemptPhase.COMPLETED, AttemptPhase.CANCELLED})  # the journal is not needed
"""Why a worker's commit is refused while its attempt's lease was not renewed in time."""


class Link(Protocol):
    """What the farm node needs to talk with the coordinator (the agent's `FarmLink`: a
    request to its own rank reaches the local handler)."""

    def handle(self, kind: type[Any], handler: Callable[..., Any]) -> None: ...
    async def request(
        self,
        peer: int,
        message: object,
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
        expect: type[Any] | None = None,
        frames: Sequence[Any] = (),
    ) -> Any: ...


class FarmNode:
    """A farm node's task side. ``link``: to the coordinator; ``wire``: to the group
    ``peers`` its journals replicate to; ``coordinator()``: the farm coordinator's rank now
    (None: not known yet)."""

    def __init__(
        self,
        *,
        rank: int,
        link: Link,
        wire: Wire,
        arenas: ArenaService,
        peers: Sequence[int],
        coordinator: Callable[[], int | None],
        capacity: Mapping[str, Any],
        labels: Sequence[str] = (),
        run_dir: Path | None = None,
        runner: AttemptRunner | None = None,
        worker_shutdown: float = 5.0,
        on_pid: Callable[[str, int], None] | None = None,
        live: Callable[[], Iterable[int]] | None = None,
        pool: PoolSettings | None = None,
    ) -> None:
        """``live()``: the peers membership holds alive (None: every peer, until one fails
        to answer: it is skipped for `PEER_BACKOFF_S` then); ``pool``: the warm task workers
        (None: the defaults; ``workers=0``: a fresh process per attempt)."""
        if arenas.tokens is None and runner is None:
            raise ValueError("a farm node's arenas must check tokens (tokens=RankTokens())")
        self.rank = rank
        self.link = link
        self.wire = wire
        self.arenas = arenas
        self.peers = tuple(pr for pr in peers if pr != rank)
        self.coordinator = coordinator
        self.capacity = dict(capacity)
        self.labels = list(labels)
        gpus = capacity.get("gpus", 0)
        self._free_gpus = list(range(gpus if isinstance(gpus, int) else 0))
        self.run_dir = run_dir
        self.runner = runner
        self._own_runner = runner is None  # workers on this incarnation's endpoint
        self.worker_shutdown = worker_shutdown
        self.on_pid = on_pid
        self.live = live
        cpus = capacity.get("cpu", 1.0)
        self.pool_settings = (PoolSettings() if pool is None else pool).for_cores(
            cpus if isinstance(cpus, int | float) else 1.0
        )
        self.pool: TaskPool | None = None  # this incarnation's warm workers
        self.journals = JournalPeers(
            wire=wire, peers=self.peers, own=self._local, on_newer=self._newer, live=live
        )
        self.replicas = self.journals.replicas
        self.running: dict[str, Running] = {}
        self._by_shard: dict[int, Running] = {}
        self._shards: dict[str, int] = {}  # task -> its shard here (kept across attempts)
        self._next_shard = TASK_SHARD_BASE
        self._free_shards: list[int] = []  # given back by finished tasks: used again first
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._offered: int | None = None  # the coordinator the offer was acked by
        self._renew = trio.Event()
        self._renewed = trio.Event()  # set (and replaced) at each answered renewal
        self._renewing = 0  # renewals awaiting their answer
        self._lease_s = 3.0  # the lease of the latest assignment (the renewal period's base)
        self._dropped: dict[str, int] = {}  # attempts ended without a report or killed -> fence
        arenas.add_commit_hook(self._committed)

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve assignments until cancelled (every attempt's worker is stopped then)."""
        self._token = trio.lowlevel.current_trio_token()
        self.link.handle(Assign, self._on_assign)
        self.link.handle(Stop, self._on_stop)
        self.journals.install()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._own_runner:  # each incarnation serves its workers anew
                    await self._serve_workers(nursery)
                nursery.start_soon(self._offer_loop)
                nursery.start_soon(self._renew_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:  # the handlers stay: they answer "not running" until the next incarnation
            self._nursery = None
            self.running.clear()
            self._by_shard.clear()

    async def _serve_workers(self, nursery: trio.Nursery) -> None:
        """The workers' journal endpoint: the agent's arenas behind the fence check."""
        base = self.run_dir if self.run_dir is not None else Path()
        endpoint = await nursery.start(
            serve_deferred, ipc_endpoint(base, f"tasks-{self.rank}"), self.handle_worker
        )
        host = JournalHost(self.arenas, endpoint)
        self.pool = None
        if self.pool_settings.enabled:
            self.pool = TaskPool(
                self.pool_settings,
                env=pool_env(),
                shutdown=self.worker_shutdown,
                label=f"task worker of node {self.rank}",
            )
            await nursery.start(self.pool.run)
        self.runner = WorkerRunner(
            host,
            base / "tasks",
            node=str(self.rank),
            shutdown=self.worker_shutdown,
            on_pid=self.on_pid,
            pool=self.pool,
            may_finish=self._may_finish,
        )

    async def handle_worker(self, frame: bytes) -> bytes | None:
        """A worker's journal request (`handle_local`); a commit is answered once the task's
        group peers hold the version (or did not answer in time): a step counts as done only
        when its result is in RAM on another node too. A write while the attempt's lease
        looks lapsed first waits (up to a lease) for a renewal: renewals merely late (a
        loaded coordinator or link) do not fail the attempt."""
        shard, commit = _write_of(frame)
        run = None if shard is None else self._by_shard.get(shard)
        if run is not None:
            await self._fresh_lease(run)
        reply = self.handle_local(frame)
        if run is not None and commit:
            await self._sync(run)
        return reply

    async def _may_finish(self, run: Running) -> str | None:
        """Why the outcome a warm worker handed back for ``run`` may not be committed now
        (None: it may): the gate of a worker's own commits (`handle_worker`)."""
        await self._fresh_lease(run)
        why = self.may_commit(run.shard, run.fence)
        if why is not None:
            log.warning("refused a task commit", shard=run.shard, why=why)
        return why

    async def _fresh_lease(self, run: Running) -> None:
        """Wait until ``run``'s lease is renewed (asking at once), it turns out a zombie, or a
        lease went by; `may_commit` then judges."""
        if run.zombie or not run.lapsed(trio.current_time()):
            return
        self._renew.set()
        with trio.move_on_after(run.lease_s):
            while (
                run.lapsed(trio.current_time())
                and not run.zombie
                and self.running.get(run.task_id) is run
            ):
                await self._renewed.wait()

    def handle_local(self, frame: bytes) -> bytes | None:
        """A worker's journal request: refused while its attempt may not commit, else served
        by the arenas (which check the worker's token for the shard and attempt)."""
        with contextlib.suppress(Exception):  # undecodable: the arenas refuse and count it
            envelope = p.decode_request(frame)
            req = envelope.request
            if isinstance(req, p.Begin | p.Commit):
                tokens = self.arenas.tokens
                grant = None if tokens is None else tokens.grant(envelope.token)
                why = self.may_commit(req.rank, None if grant is None else grant.generation)
                if why is not None:
                    log.warning("refused a task commit", shard=req.rank, why=why)
                    return p.encode_error(envelope.id, f"task journal commit refused: {why}")
        return self.arenas.handle(frame)

    def may_commit(self, shard: int, fence: int | None = None) -> str | None:
        """None when the attempt writing ``shard`` (under ``fence``, its worker's token's:
        None, not known) may commit now, else why not (counted)."""
        run = self._by_shard.get(shard)
        if run is None:
            return "no attempt of this node writes this journal"
        why = None
        if fence is not None and fence != run.fence:
            return STALE_FENCE  # an older attempt's worker, not killed yet
        if run.zombie or self.replicas.fence(run.task_id) > run.fence:
            why = STALE_FENCE
        elif run.lapsed(trio.current_time()):
            why = LAPSED
        if why is not None:
            run.refused += 1
        return why

    # -- coordinator -> node -----------------------------------------------------------------

    async def _on_assign(self, msg: Any) -> object:
        a: Assign = msg.body
        known = self.replicas.fence(a.task_id)
        current = self.running.get(a.task_id)
        if current is not None and current.fence == a.fence:
            return Ack(True, "already running")
        if a.fence < known or (a.fence == known and current is None and a.task_id in self._shards):
            return Ack(False, STALE_FENCE)
        try:
            spec = TaskSpec.from_bytes(a.spec, f"task {a.task_id}")
        except Exception as exc:  # a spec this node cannot read: the coordinator's to handle
            return Ack(False, f"bad spec: {exc}")
        if self._nursery is None:
            return Ack(False, "farm node not running")
        want = a.needs.get("gpus", 0)
        want = want if isinstance(want, int) and want > 0 else 0
        if current is not None:  # an older attempt of the task still here: a zombie now
            self._zombie(current)
            self._free(current)
        if want > len(self._free_gpus):
            return Ack(False, f"needs {want} GPU(s), {len(self._free_gpus)} free here")
        gpus, self._free_gpus = tuple(self._free_gpus[:want]), self._free_gpus[want:]
        self.replicas.learn(a.task_id, a.fence)
        run = Running(
            task_id=a.task_id,
            attempt=max(1, a.attempt),
            fence=a.fence,
            spec=spec,
            lease_s=a.lease_s,
            shard=self._shard(a.task_id),
            renewed_at=trio.current_time(),
            trace=dict(msg.trace),
            fetch_from=tuple(a.fetch_from),
            gpus=gpus,
        )
        self.running[a.task_id] = run
        self._by_shard[run.shard] = run
        self._lease_s = a.lease_s
        self._nursery.start_soon(self._attempt, run, name=f"task {a.task_id}")
        self._renew.set()
        return Ack(True)

    async def _on_stop(self, msg: Any) -> object:
        s: Stop = msg.body
        run = self.running.get(s.task_id)
        if run is None or run.fence != s.fence:
            return Ack(False, "no such attempt here")
        if run.stop is not StopWhy.CANCEL:
            run.stop = s.why
        run.halt(hard=False)  # SIGTERM: the worker commits what it finished, then exits
        return Ack(True)

    # -- journals: replicas for peers ---------------------------------------------------------

    def _local(self, task_id: str) -> Replica | None:
        """The newest version of ``task_id``'s journal in this node's own arenas."""
        shard = self._shards.get(task_id)
        if shard is None:
            return None
        held = self.arenas.versions(shard)
        if not held:
            return None
        newest = max(held, key=lambda v: (v.generation, v.step))
        try:
            with self.arenas.shard(shard, newest.step) as s:
                return Replica(
                    task_id, s.manifest.generation, s.manifest.step, s.raw, bytes(s.data)
                )
        except SnapshotError:
            return None

    def _newer(self, task_id: str, fence: int) -> None:
        """A peer heard of ``fence`` for the task: an attempt of it here under an older one
        is a zombie (the task moved on elsewhere)."""
        run = self.running.get(task_id)
        if run is not None and run.fence < fence:
            self._zombie(run)

    def _best(self, task_id: str) -> Replica | None:
        """The newest journal of ``task_id`` this node has: its own, or a peer's replica."""
        best: Replica | None = self.journals.best(task_id)
        return best

    def _free(self, run: Running) -> None:
        """Give ``run``'s GPUs back (once)."""
        self._free_gpus = sorted({*self._free_gpus, *run.gpus})
        run.gpus = ()

    def _forget(self, run: Running) -> None:
        """The task is over: its journal shard goes (the arena back to the budget, the
        shard's token revoked, the number free for the next task)."""
        if self.arenas.release(run.shard):
            self._shards.pop(run.task_id, None)
            self._by_shard.pop(run.shard, None)
            if self.arenas.tokens is not None:
                self.arenas.tokens.revoke(run.shard)
            self._free_shards.append(run.shard)

    def _shard(self, task_id: str) -> int:
        shard = self._shards.get(task_id)
        if shard is None:
            if self._free_shards:
                shard = self._free_shards.pop()
            elif self._next_shard < _SHARD_LIMIT:
                shard = self._next_shard
                self._next_shard += 1
            else:
                raise SnapshotError(
                    f"this agent holds {_SHARD_LIMIT - TASK_SHARD_BASE} task journals at once:"
                    " no shard left for another"
                )
            self._shards[task_id] = shard
        return shard

    def _committed(self, event: CommitEvent) -> None:
        """Arena commit hook (any thread): a worker committed its task's journal."""
        if event.rank < TASK_SHARD_BASE or event.info.source != Source.LOCAL:
            return
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._poke, event.rank)

    def _poke(self, shard: int) -> None:
        run = self._by_shard.get(shard)
        if run is not None:
            run.changed.set()

    # -- one attempt ------------------------------------------------------------------------

    async def _attempt(self, run: Running) -> None:
        recovery = RecoveryTrace.join(run.trace, rank=self.rank) if run.trace else None
        try:
            with _activated(recovery):
                seeded = await self._seed(run, recovery)
            if run.zombie:
                return
            with contextlib.ExitStack() as stack:
                stack.enter_context(
                    attempt_span(run.task_id, run.attempt, self.rank, run.spec.target)
                )
                if recovery is not None:
                    stack.enter_context(_activated(recovery))
                    # from the journal in place to the worker running (the coordinator ends
                    # the recovery when it hears the attempt started)
                    run.resuming = stack.enter_context(contextlib.ExitStack())
                    run.resuming.enter_context(
                        recovery.phase(
                            Phase.RESUME,
                            {TASK_ID_ATTR: run.task_id, STEPS_ATTR: seeded},
                            node_rank=self.rank,
                        )
                    )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._started, run)
                    nursery.start_soon(self._follow, run)
                    assert self.runner is not None
                    end = await self.runner(run)
                    run.finished = True  # its lease is no longer renewed: the end is told
                    nursery.cancel_scope.cancel()
            view = await self._sync(run)  # the last versions reach the peers before the end
            if _dead(run):
                log.warning("zombie attempt ended", task=run.task_id, fence=run.fence)
                return
            if run.refused and (end.outcome is None or not end.outcome.ok):
                # its commits were refused (lease lapsed): not the task's error; the next
                # renewals say it was dropped, and the coordinator requeues it
                log.warning("attempt ended after refused commits", task=run.task_id)
                self._dropped[run.task_id] = run.fence
                self._renew.set()
                return
            phase, extra = end_phase(run, end)
            if view is not None:
                extra.update(progress=view[0], steps=view[1])
            await self._update(run, phase, final=True, **extra)
            if phase in _DONE and not _dead(run):
                self._forget(run)
        except SnapshotError as exc:  # the journal could not be seeded here
            log.error("task attempt could not start", task=run.task_id, error=str(exc))
            await self._update(run, AttemptPhase.START_FAILED, final=True, error=str(exc))
        finally:
            run.ended.set()
            self._free(run)
            if self.running.get(run.task_id) is run:
                del self.running[run.task_id]
                self._by_shard.pop(run.shard, None)

    async def _seed(self, run: Running, recovery: RecoveryTrace | None) -> int:
        """Put the newest journal of the task (this node's, a replica held here, or one
        fetched from ``fetch_from``) in the task's shard; returns its committed steps."""
        best = self._best(run.task_id)
        source = (
            "" if best is None else ("replica" if best is self.replicas.get(run.task_id) else "own")
        )
        ask = [r for r in run.fetch_from if r != self.rank]
        if ask and self.rank not in run.fetch_from:
            with maybe_phase(recovery, Phase.FETCH, node_rank=self.rank) as span:
                fetched = await self.journals.fetch(run.task_id, run.fence, ask)
                if span is not None and fetched is not None:
                    span.set(snapshot_source=Source.PEER.value, bytes=len(fetched.data))
                elif span is not None:
                    span.set(reason="no replica on the ranks asked")
            if fetched is not None and (best is None or fetched.order > best.order):
                best, source = fetched, "fetched"
        elif recovery is not None and best is not None:
            with recovery.phase(Phase.FETCH, node_rank=self.rank) as span:
                span.set(snapshot_source=Source.LOCAL.value, bytes=len(best.data))
        if best is None:
            return 0
        local = self._local(run.task_id)
        if local is None or local.order < best.order:
            self._ingest(run, best)
        commit, _ = unpack(best.data)
        log.info(
            "task journal seeded",
            task=run.task_id,
            fence=run.fence,
            from_fence=best.fence,
            steps=len(commit.steps),
            source=source,  # own arenas, a replica held here for a peer, or fetched
        )
        return len(commit.steps)

    def _ingest(self, run: Running, replica: Replica) -> None:
        """Copy ``replica`` into the task's shard as its newest version (this attempt's fence)."""
        m = verified(run.task_id, replica.manifest, replica.data)
        held = self.arenas.versions(run.shard)
        step = max((v.step for v in held), default=0) + 1
        m = attrs.evolve(
            m, step=step, generation=run.fence, rank=run.shard, world_size=run.shard + 1
        )
        with self.arenas.ingesting(run.shard, m, source=Source.PEER.value) as view:
            view[:] = replica.data

    async def _started(self, run: Running) -> None:
        """Once the attempt's worker runs: the resume phase ends, the coordinator is told."""
        await run.spawned.wait()
        if run.resuming is not None:
            run.resuming.close()
            run.resuming = None
        if not run.trace:  # a recovery ends when the coordinator hears of the start: at once
            await trio.sleep(QUIET_START_S)
        await self._update(run, AttemptPhase.STARTED)

    async def _follow(self, run: Running) -> None:
        """While the worker runs: each commit goes to the peers, progress to the coordinator."""
        last = -PROGRESS_EVERY_S
        while True:
            await run.changed.wait()
            run.changed = trio.Event()
            view = await self._sync(run)
            if view is None or run.zombie or run.outcome_committed:
                continue
            now = trio.current_time()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                progress, steps = view
                await self._update(run, AttemptPhase.PROGRESS, progress=progress, steps=steps)
            else:
                await trio.sleep(PROGRESS_EVERY_S - (now - last))
                run.changed.set()  # report the newest after the pause

    async def _sync(self, run: Running) -> tuple[float, int] | None:
        """Push the newest local version of the task's journal to the peers (once each; a
        caller meanwhile waits for that push); its progress and committed steps."""
        async with run.pushing:
            return await self._sync_locked(run)

    async def _sync_locked(self, run: Running) -> tuple[float, int] | None:
        if run.zombie:
            return None
        replica = self._local(run.task_id)
        if replica is None:
            return None
        commit, outcome = unpack(replica.data)
        run.outcome_committed = outcome is not None and outcome.attempt == run.attempt
        if replica.order != run.pushed:
            acked, stale = await self.journals.push(replica)
            run.pushed = replica.order
            if stale:
                self._zombie(run)
            run.replicas = acked | {self.rank}
        return min(1.0, max(0.0, commit.progress)), len(commit.steps)

    # -- to the coordinator -----------------------------------------------------------------

    async def _update(
        self, run: Running, phase: AttemptPhase, *, final: bool = False, **fields: Any
    ) -> None:
        """Tell the coordinator; a final phase is retried until acknowledged (or stale). A
        large result travels as the payload (the header is bounded at 64 KiB), an error text
        is cut to `MAX_ERROR_CHARS`."""
        frames: list[bytes] = []
        result = fields.get("result")
        if isinstance(result, bytes) and len(result) > INLINE_BYTES:
            fields["result"], frames = None, [result]
        error = fields.get("error")
        if isinstance(error, str) and len(error) > MAX_ERROR_CHARS:
            fields["error"] = error[: MAX_ERROR_CHARS - 3] + "..."
        msg = Update(
            node=self.rank,
            task_id=run.task_id,
            attempt=run.attempt,
            fence=run.fence,
            phase=phase,
            replicas=sorted(run.replicas),
            **fields,
        )
        delay = 0.2
        while not run.zombie:
            coord = self.coordinator()
            if coord is not None:
                try:
                    timeout = FINAL_UPDATE_TIMEOUT_S if final else REQUEST_TIMEOUT_S
                    reply = await self._ask(coord, msg, Ack, frames, timeout)
                except ClusterError as exc:
                    log.info("update not delivered", task=run.task_id, error=str(exc))
                else:
                    ack: Ack = reply.body
                    if ack.ok:
                        return
                    if ack.reason == STALE_FENCE:
                        self._zombie(run)
                        return
                    log.info("update refused", task=run.task_id, reason=ack.reason)
            if not final:
                return
            await trio.sleep(delay)
            delay = min(2.0, delay * 2)

    async def _ask(
        self,
        peer: int,
        message: object,
        expect: type[Any],
        frames: Sequence[Any] = (),
        timeout: float = REQUEST_TIMEOUT_S,  # noqa: ASYNC109
    ) -> Any:
        if frames:
            return await self.link.request(
                peer, message, timeout=timeout, expect=expect, frames=frames
            )
        return await self.link.request(peer, message, timeout=timeout, expect=expect)

    async def _offer_loop(self) -> None:
        """Offer this node's capacity to the coordinator, again whenever it changes."""
        offer = Offer(self.rank, self.capacity, self.labels)
        while True:
            coord = self.coordinator()
            if coord is not None and coord != self._offered:
                try:
                    reply = await self._ask(coord, offer, Ack)
                except ClusterError as exc:
                    log.info("offer not delivered", coordinator=coord, error=str(exc))
                else:
                    if reply.body.ok:
                        self._offered = coord
            await trio.sleep(0.5 if self._offered != coord else 1.0)

    def _lease(self) -> float:
        return min((r.lease_s for r in self.running.values()), default=self._lease_s)

    async def _renew_loop(self) -> None:
        """Every ``lease_s / 3`` (at once after an assignment or for a waiting commit) renew
        the attempts held here, also none (the node's sign of life: the coordinator moves a
        task a live node no longer names). Each renewal goes on its own: a slow answer never
        delays the next one past the lease, and a late answer still counts from its ask."""
        async with trio.open_nursery() as nursery:
            while True:
                with trio.move_on_after(self._lease() / 3):
                    await self._renew.wait()
                self._renew = trio.Event()
                # a finished attempt is renewed until its end is reported: until then the
                # coordinator must not take it for dropped (and run the task again)
                held = [r for r in self.running.values() if not r.zombie]
                coord = self.coordinator()
                if coord is None or self._renewing >= RENEWALS_IN_FLIGHT:
                    continue
                self._renewing += 1
                nursery.start_soon(self._renew_once, coord, held)

    async def _renew_once(self, coord: int, held: list[Running]) -> None:
        """One renewal of ``held`` (see `_renew_loop`)."""
        try:
            await self._renewal(coord, held)
        finally:
            self._renewing -= 1
            self._renewed.set()  # a waiting commit looks again
            self._renewed = trio.Event()

    async def _renewal(self, coord: int, held: list[Running]) -> None:
        """Ask ``coord`` to renew ``held``: a stale one is a zombie, the others' leases count
        from this ask."""
        pairs = [(r.task_id, r.fence) for r in held]
        inline = len(pairs) <= RENEW_INLINE
        frames = [] if inline else [msgpack.packb(pairs, use_bin_type=True)]
        dropped = sorted(self._dropped.items())[:RENEW_INLINE]
        sent = trio.current_time()
        try:
            reply = await self._ask(
                coord,
                Renew(self.rank, pairs if inline else [], dropped),
                Renewed,
                frames,
                timeout=self._lease(),
            )
        except ClusterError as exc:
            log.info("lease renewal not delivered", coordinator=coord, error=str(exc))
            return
        answer: Renewed = reply.body
        if not answer.ok:
            log.info("lease renewal refused", coordinator=coord, reason=answer.reason)
            self._offered = None
            return
        for task_id, fence in dropped:  # the coordinator heard it
            if self._dropped.get(task_id) == fence:
                del self._dropped[task_id]
        stale = set(answer.stale)
        for r in held:
            if r.task_id in stale:
                self._zombie(r)
            elif self.running.get(r.task_id) is r:
                r.renewed_at = max(r.renewed_at, sent)  # the lease counts from the ask

    def _zombie(self, run: Running) -> None:
        """``run``'s fence is stale (the task moved): kill its worker at once, its journal
        writes are refused from now on."""
        if run.zombie:
            return
        run.zombie = True
        # said dropped in the next renewals: a coordinator that still counts it current
        # (leadership moved meanwhile) moves it at once, not after a live node's leases
        self._dropped[run.task_id] = run.fence
        if run.finished:  # its worker is gone; its end was taken, or the task moved on
            log.debug("attempt over and no longer current", task=run.task_id, fence=run.fence)
        else:
            log.warning("zombie attempt: killing its worker", task=run.task_id, fence=run.fence)
            run.halt(hard=True)
        run.changed.set()


def _write_of(frame: bytes) -> tuple[int | None, bool]:
    """The shard a worker's request writes (a begin or a commit; None: another request, or
    undecodable), and whether it is a commit."""
    try:
        req = p.decode_request(frame).request
    except Exception:  # the arenas refuse it
        return None, False
    if isinstance(req, p.Begin | p.Commit):
        return req.rank, isinstance(req, p.Commit)
    return None, False


def _dead(run: Running) -> bool:
    """Whether ``run`` turned out a zombie (set by other tasks while this one waited)."""
    return run.zombie


@contextlib.contextmanager
def _activated(recovery: RecoveryTrace | None) -> Iterator[None]:
    if recovery is None:
        yield
        return
    with recovery.activate():
        yield


def group_peers(rank: int, n_nodes: int, replicas: int, placement: str) -> tuple[int, ...]:
    """The nodes ``rank``'s task journals replicate to: its group peers under the policy's
    ``replication`` (the same placement as training snapshots)."""
    if n_nodes < 2 or replicas < 2:
        return ()
    return place(n_nodes, min(replicas, n_nodes), placement)[rank][1:]


def agent_farm_node(
    ctx: NodeContext,
    link: Link,
    *,
    coordinator: Callable[[], int | None],
    capacity: Mapping[str, Any],
    labels: Sequence[str] = (),
) -> FarmNode:
    """The farm node side of a node agent: its transport, arenas (a shard per task, behind
    the workers' tokens), run dir and worker grace; ``link`` is the agent's `FarmLink` (shared
    with its `FarmControl`, so an assignment to the coordinator's own node takes the same
    path). Build it once per `NodeRuntime` (it hooks the arenas' commits) and run it as a
    child of the node's tree: ``child(farm_node.run, id="farm_node")`` (a restart of the child
    stops its attempts' workers; the coordinator requeues them when their leases run out)."""
    config = ctx.config
    rep = config.policy.replication
    return FarmNode(
        rank=config.rank,
        link=link,
        wire=ctx.transport,
        arenas=ctx.arenas,
        peers=group_peers(config.rank, config.n_nodes, rep.replicas, rep.placement),
        coordinator=coordinator,
        capacity=capacity,
        labels=labels,
        run_dir=ctx.run_dir,
        worker_shutdown=config.worker_shutdown,
        live=ctx.membership.live,
        pool=None if config.farm is None else config.farm.pool,
    )
