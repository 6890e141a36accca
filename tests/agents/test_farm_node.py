"""The farm node's task side in virtual time: attempts run in-process against journals in
each node's arenas, over a fake transport with a fake coordinator. A task's journal reaches
its group peer; after a node loss another node resumes it from the replica in its RAM or
fetched, without running a finished step again; a frozen node's zombie attempt commits
nowhere (its commits refused locally, its pushes by the holder, its updates by the
coordinator) and the task completes once; pause and cancel; a renewal naming an attempt
stale kills it."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import farmfuncs
import pytest
import trio
from farmnodekit import FakeCoordinator
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import supervise.telemetry.lifecycle as telemetry_setup
from supervise._testing import free_ports
from supervise.agents import farm_node
from supervise.agents.config import NodeConfig
from supervise.agents.farm_attempt import WorkerRunner, devices
from supervise.agents.farm_journals import PEER_BACKOFF_S, REQUEST_TIMEOUT_S
from supervise.agents.farm_node import (
    LAPSED,
    TASK_SHARD_BASE,
    FarmNode,
    Running,
    group_peers,
)
from supervise.agents.node import NodeRuntime
from supervise.cluster import DEFERRED, Reply
from supervise.cluster.errors import RemoteError, RequestTimeout
from supervise.policy import Policy
from supervise.snapshot import protocol as p
from supervise.snapshot.budget import MemoryBudget
from supervise.snapshot.client import LocalOwner
from supervise.snapshot.errors import SnapshotError
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService
from supervise.snapshot.tokens import RankTokens
from supervise.tasks import ArenaJournal, InProcess, TaskSpec, decode
from supervise.tasks.control import FarmControl
from supervise.tasks.farm_link import FarmLink
from supervise.tasks.farm_messages import (
    MAX_ERROR_CHARS,
    STALE_FENCE,
    Ack,
    Assign,
    AttemptPhase,
    Renew,
    ResultQuery,
    ResultReply,
    Stop,
    StopWhy,
    Submit,
    TaskReply,
    Update,
)
from supervise.tasks.journal import Commit, StepRecord
from supervise.tasks.journal_replica import JournalReplicas, Replica
from supervise.tasks.resources import Resources
from supervise.tasks.runner import AttemptEnd
from supervise.telemetry import Phase, RecoveryTrace, Telemetry, TelemetryConfig, Trigger
from tests.tasks.farmkit import Delays, on_the_wire

COORD = 9
_IDS = itertools.count(1)
LEASE = 3.0


@attrs.frozen
class FakeIncoming:
    body: Any
    sender: int | None
    buffers: tuple[memoryview, ...] = ()
    trace: Mapping[str, str] = attrs.field(factory=dict)
    request_id: int = 0


class FakeNet:
    """In-process requests between ranks, packed as the transport packs them (a header over
    its bound fails as there); a rank ``down`` or ``frozen`` never answers; ``delays``: kinds
    of messages that reach their handler late."""

    def __init__(self) -> None:
        self.handlers: dict[int, dict[type[Any], Callable[..., Any]]] = {}
        self.down: set[int] = set()
        self.frozen: set[int] = set()
        self.pending: dict[int, trio.MemorySendChannel[object]] = {}
        self.delays = Delays()

    def link(self, rank: int) -> FakeLink:
        self.handlers.setdefault(rank, {})
        return FakeLink(self, rank)


class FakeLink:
    def __init__(self, net: FakeNet, rank: int) -> None:
        self.net = net
        self.rank = rank

    def handle(self, kind: type[Any], handler: Callable[..., Any]) -> None:
        self.net.handlers[self.rank][kind] = handler

    def unhandle(self, kind: type[Any], handler: Callable[..., Any] | None = None) -> None:
        self.net.handlers[self.rank].pop(kind, None)

    async def request(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
        expect: type[Any] | None = None,
    ) -> Any:
        net = self.net
        on_the_wire(message, frames, trace)
        with trio.move_on_after(timeout):
            while {self.rank, peer} & (net.down | net.frozen):  # noqa: ASYNC110 (a fake link polls)
                await trio.sleep(0.05)
            await trio.sleep(net.delays.of(self.rank, type(message)))
            handler = net.handlers.get(peer, {}).get(type(message))
            if handler is None:
                raise RequestTimeout(f"rank {peer} does not serve {type(message).__name__}")
            bufs = tuple(memoryview(bytes(f)) for f in frames)
            rid = next(_IDS)
            send, receive = trio.open_memory_channel[object](1)
            net.pending[rid] = send
            try:
                reply = await handler(
                    FakeIncoming(message, self.rank, bufs, dict(trace or {}), rid)
                )
                if reply is DEFERRED:  # answered later, with `reply`
                    reply = await receive.receive()
            finally:
                net.pending.pop(rid, None)
            if self.rank in net.down | net.frozen:  # the asker died or froze meanwhile
                await trio.sleep_forever()
            if isinstance(reply, Reply):
                out = tuple(memoryview(bytes(f)) for f in reply.frames)
                reply_body = reply.body
            else:
                out, reply_body = (), reply
            try:  # an answer over the bound is an error reply, as the transport's router gives
                on_the_wire(reply_body, out, reply=True)
            except ValueError as exc:
                raise RemoteError(type(message).__name__, f"bad reply: {exc}") from None
            return FakeIncoming(reply_body, peer, out)
        raise RequestTimeout(f"no reply from rank {peer}")

    async def reply(
        self,
        request: Any,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        on_the_wire(message, frames, trace, reply=True)
        send = self.net.pending.get(request.request_id)
        if send is not None:
            send.send_nowait(Reply(message, frames=list(frames)) if frames else message)


class FencedOwner(LocalOwner):
    """An in-process owner that asks the node first, as the workers' endpoint does."""

    def __init__(self, service: ArenaService, rank: int, node: FarmNode) -> None:
        super().__init__(service, rank)
        self.node = node

    def _check(self) -> None:
        why = self.node.may_commit(self.rank)
        if why is not None:
            raise SnapshotError(f"task journal commit refused: {why}")

    def begin(self) -> Any:
        self._check()
        return super().begin()

    def commit(self, slot: Any, manifest: bytes) -> Any:
        self._check()
        return super().commit(slot, manifest)


class InProcessRunner:
    """Attempts as trio tasks of the test (a hard or soft stop cancels them)."""

    def __init__(self) -> None:
        self.node: FarmNode | None = None

    async def __call__(self, run: Running) -> AttemptEnd:
        assert self.node is not None
        owner = FencedOwner(self.node.arenas, run.shard, self.node)
        try:
            journal = ArenaJournal(owner, generation=run.fence)
            with trio.CancelScope() as scope:
                run.signal_worker = lambda hard: scope.cancel()
                run.spawned.set()
                if run.stop is not None or run.zombie:
                    scope.cancel()
                return await InProcess(run.spec, journal, node=str(self.node.rank))(run.attempt)
        except SnapshotError as exc:
            return AttemptEnd(None, lost=f"journal refused: {exc}")
        return AttemptEnd(None, lost="stopped")


class Farm:
    def __init__(self, tmp: Path, nursery: trio.Nursery, peers: dict[int, list[int]]) -> None:
        self.net = FakeNet()
        self.coord = FakeCoordinator(self.net.link(COORD))
        self.nodes: dict[int, FarmNode] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.tmp = tmp
        self.nursery = nursery
        self.peers = peers

    async def start(self, rank: int, tokens: RankTokens | None = None, gpus: int = 0) -> FarmNode:
        runner = InProcessRunner()
        arenas = ArenaService(
            self.tmp / f"shm{rank}",
            rule=RetentionRule(keep_last=2),
            budget=MemoryBudget(1 << 28),
            node=f"t{rank}",
            anonymous=True,
            tokens=tokens,
        )
        node = FarmNode(
            rank=rank,
            link=self.net.link(rank),
            wire=self.net.link(rank),
            arenas=arenas,
            peers=self.peers[rank],
            coordinator=lambda: COORD,
            capacity={"cpu": 2.0, "memory": 0, "gpus": gpus},
            runner=runner,
        )
        runner.node = node
        scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await node.run(task_status=task_status)

        await self.nursery.start(serve)
        self.nodes[rank] = node
        self.scopes[rank] = scope
        return node

    def kill(self, rank: int) -> None:
        """The whole node is gone (agent and attempts, its RAM with them)."""
        self.net.down.add(rank)
        self.scopes[rank].cancel()

    async def assign(
        self,
        rank: int,
        spec: TaskSpec,
        fence: int,
        fetch_from: Sequence[int] = (),
        trace: Mapping[str, str] | None = None,
        gpus: int = 0,
    ) -> Ack:
        self.coord.fences[spec.task_id] = fence
        reply = await self.net.link(COORD).request(
            rank,
            Assign(
                spec.task_id,
                fence,
                fence,
                spec.to_bytes(),
                {"cpu": 1, "gpus": gpus},
                LEASE,
                list(fetch_from),
            ),
            trace=trace,
        )
        ack: Ack = reply.body
        return ack


@pytest.fixture(autouse=True)
def _calls(monkeypatch: pytest.MonkeyPatch) -> None:
    farmfuncs.CALLS.clear()

    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        return fn(*args)

    # journal commits run inline, not in threads: a thread at work would let the autojump
    # clock leap past leases (virtual time must only pass where a test sleeps)
    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


def _spec(task_id: str, n: int) -> TaskSpec:
    return TaskSpec("farmfuncs:ticks", (n,), task_id=task_id)


async def _until(cond: Callable[[], bool], limit: float = 60.0) -> None:
    with trio.fail_after(limit):
        while not cond():  # noqa: ASYNC110 (conditions on several objects)
            await trio.sleep(0.05)


async def test_node_loss_resumes_from_the_peer_replica_and_a_fetched_one(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: [1], 1: [0], 2: []})
        a, b, c = [await farm.start(r) for r in (0, 1, 2)]
        await _until(lambda: len(farm.coord.offers) == 3)
        spec = _spec("t1", 6)
        assert (await farm.assign(0, spec, fence=1)).ok
        await _until(lambda: b.replicas.get("t1") is not None and len(farm.coord.phases("t1")) > 2)
        # node 0 dies mid-step: steps s0, s1 are done (the replica on node 1 holds them)
        await _until(lambda: farmfuncs.CALLS["s2"] == 1)
        await trio.sleep(0.5)
        farm.kill(0)
        assert a.replicas.get("t1") is None  # a's own RAM is gone with it; b holds the replica
        held = b.replicas.get("t1")
        assert held is not None and held.fence == 1
        assert (await farm.assign(1, spec, fence=2, fetch_from=[1])).ok
        await _until(lambda: bool(farm.coord.completed("t1")))
        done = farm.coord.completed("t1")
        assert len(done) == 1 and done[0].node == 1 and done[0].fence == 2
        assert done[0].result is not None and decode(done[0].result) == sum(i * i for i in range(6))
        assert all(farmfuncs.CALLS[f"s{i}"] == 1 for i in range(6)), farmfuncs.CALLS
        assert 0 in done[0].replicas or 1 in done[0].replicas
        await _until(lambda: not b.arenas.ranks)  # the finished task's shard is given back

        # a node outside the group fetches the journal from a holder and resumes from it:
        # node 1 runs t2 until two steps are done, then is lost; node 2 fetches from node 0
        spec2 = _spec("t2", 4)
        farm.net.down.discard(0)
        a = await farm.start(0)  # node 0 back with empty RAM
        await trio.sleep(PEER_BACKOFF_S)  # node 1 tries it again (an agent: membership says)
        assert (await farm.assign(1, spec2, fence=1)).ok
        await _until(lambda: farmfuncs.CALLS["s1"] == 2)  # t1's s1 once, t2's s1 once
        await _until(lambda: (r := a.replicas.get("t2")) is not None and r.version >= 2)
        farm.kill(1)
        before = dict(farmfuncs.CALLS)
        assert (await farm.assign(2, spec2, fence=2, fetch_from=[0])).ok
        await _until(lambda: bool(farm.coord.completed("t2")))
        assert decode(farm.coord.completed("t2")[0].result or b"") == 0 + 1 + 4 + 9
        assert farmfuncs.CALLS["s0"] == before["s0"] and farmfuncs.CALLS["s1"] == before["s1"]
        assert c.replicas.get("t2") is None  # it fetched into its own arenas, held nothing
        nursery.cancel_scope.cancel()


async def test_a_frozen_nodes_zombie_commits_nowhere_and_the_task_completes_once(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: [1], 1: [0]})
        a, b = [await farm.start(r) for r in (0, 1)]
        spec = _spec("z", 8)
        assert (await farm.assign(0, spec, fence=1)).ok
        await _until(lambda: farmfuncs.CALLS["s1"] == 1)
        run0 = a.running["z"]
        farm.net.frozen.add(0)  # node 0 can reach nobody: its lease runs out
        await trio.sleep(LEASE + 1)
        assert run0.refused >= 1  # its own agent refused the steps it finished since
        assert a.may_commit(run0.shard) in (LAPSED, "no attempt of this node writes this journal")
        # the coordinator moves the task to node 1 (fence 2), which resumes from its replica
        assert (await farm.assign(1, spec, fence=2, fetch_from=[1])).ok
        await _until(
            lambda: ((r := b.replicas.get("z")) is not None and r.fence == 2) or "z" in b.running
        )
        farm.net.frozen.discard(0)  # thawed: the zombie's writes are refused everywhere
        await _until(lambda: bool(farm.coord.completed("z")))
        done = farm.coord.completed("z")
        assert len(done) == 1 and done[0].fence == 2 and done[0].node == 1
        assert decode(done[0].result or b"") == sum(i * i for i in range(8))
        # a stale push reaches the holder: refused
        assert b.replicas.fence("z") == 2
        nursery.cancel_scope.cancel()
    assert all(u.fence == 1 for u in farm.coord.refused)
    assert not any(u.phase is AttemptPhase.COMPLETED and u.fence == 1 for u in farm.coord.updates)


async def test_holders_refuse_a_version_older_than_the_fence_they_know(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: [1], 1: [0]})
        a, b = [await farm.start(r) for r in (0, 1)]
        spec = _spec("f", 3)
        assert (await farm.assign(0, spec, fence=5)).ok
        await _until(lambda: b.replicas.get("f") is not None)
        b.replicas.learn("f", 6)  # node 1 heard of a newer assignment of the task
        await _until(lambda: b.journals.refused_pushes >= 1 or not a.running)
        assert b.journals.refused_pushes >= 1
        assert "f" not in a.running  # the refusal told node 0 its attempt is a zombie: killed
        assert not farm.coord.completed("f")
        # an assignment with an older fence than known is refused too
        ack = await farm.assign(1, spec, fence=4)
        assert not ack.ok and ack.reason == STALE_FENCE
        nursery.cancel_scope.cancel()


async def test_a_large_result_and_a_long_error_reach_the_coordinator(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A result over a header's bound travels as payload and an error text is cut: the
    final reports cross a wire bounded as the transport's (they used to fail to send)."""
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: []})
        await farm.start(0)
        assert (await farm.assign(0, TaskSpec("farmfuncs:big", (200_000,), task_id="b"), 1)).ok
        await _until(lambda: bool(farm.coord.completed("b")))
        (done,) = farm.coord.completed("b")
        assert decode(done.result or b"") == b"x" * 200_000
        assert (await farm.assign(0, TaskSpec("farmfuncs:fails", (100_000,), task_id="e"), 1)).ok
        await _until(lambda: (0, AttemptPhase.ERRORED) in farm.coord.phases("e"))
        (err,) = [u for u in farm.coord.updates if u.phase is AttemptPhase.ERRORED]
        assert err.error is not None and "ValueError: EEE" in err.error
        assert len(err.error) <= MAX_ERROR_CHARS
        nursery.cancel_scope.cancel()


async def test_pause_checkpoints_then_stops_cancel_stops_and_a_stale_renewal_kills(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: [1], 1: [0]})
        _, b = [await farm.start(r) for r in (0, 1)]
        coord = farm.net.link(COORD)
        spec = _spec("p", 5)
        assert (await farm.assign(0, spec, fence=1)).ok
        await _until(lambda: farmfuncs.CALLS["s1"] == 1)
        assert (await coord.request(0, Stop("p", 1, StopWhy.PAUSE))).body.ok
        await _until(lambda: (0, AttemptPhase.PAUSED) in farm.coord.phases("p"))
        held = b.replicas.get("p")
        assert held is not None  # the checkpoint reached the peer before PAUSED was told
        # resumed on the same node: steps done before the pause are not run again
        assert (await farm.assign(0, spec, fence=2, fetch_from=[1])).ok
        await _until(lambda: bool(farm.coord.completed("p")))
        assert all(farmfuncs.CALLS[f"s{i}"] == 1 for i in range(5)), farmfuncs.CALLS

        spec = _spec("c", 5)
        assert (await farm.assign(1, spec, fence=1)).ok
        await _until(lambda: "c" in b.running)
        assert (await coord.request(1, Stop("c", 1, StopWhy.CANCEL))).body.ok
        await _until(lambda: (1, AttemptPhase.CANCELLED) in farm.coord.phases("c"))
        assert not (await coord.request(1, Stop("c", 1, StopWhy.CANCEL))).body.ok  # gone

        spec = _spec("s", 20)
        assert (await farm.assign(1, spec, fence=1)).ok
        await _until(lambda: "s" in b.running)
        farm.coord.fences["s"] = 2  # the coordinator moved it: the next renewal says stale
        await _until(lambda: "s" not in b.running)
        assert not farm.coord.completed("s")
        # the killed attempt is said dropped (for a coordinator that still counts it current)
        await _until(lambda: any(("s", 1) in r.dropped for r in farm.coord.renewals))
        nursery.cancel_scope.cancel()


async def test_the_workers_endpoint_refuses_commits_of_an_attempt_that_may_not_commit(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: []})
        tokens = RankTokens()
        a = await farm.start(0, tokens)
        frame = p.encode_request(p.Begin(rank=50_000), 7)
        reply = a.handle_local(frame)
        assert reply is not None and b"no attempt of this node" in reply
        spec = _spec("e", 50)
        assert (await farm.assign(0, spec, fence=2)).ok
        shard = a.running["e"].shard
        # a worker of an older attempt of the task, still alive: refused
        old = p.encode_request(p.Begin(rank=shard), 8, tokens.issue(shard, 1))
        reply = a.handle_local(old)
        assert reply is not None and STALE_FENCE.encode() in reply
        # the current attempt's worker goes through to the arenas (which serve it)
        new = p.encode_request(p.Begin(rank=shard), 9, tokens.issue(shard, 2))
        reply = a.handle_local(new)
        assert reply is not None and b"refused" not in reply
        nursery.cancel_scope.cancel()


async def test_the_resume_side_of_a_moved_task_joins_the_coordinators_recovery_trace(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    tel = Telemetry.create(
        TelemetryConfig(), rank=1, span_processors=[SimpleSpanProcessor(exporter)]
    )
    monkeypatch.setattr(telemetry_setup._process, "current", tel)
    try:
        async with trio.open_nursery() as nursery:
            farm = Farm(tmp_path, nursery, {0: [1], 1: [0], 2: []})
            _, b, _ = [await farm.start(r) for r in (0, 1, 2)]
            spec = _spec("r", 4)
            assert (await farm.assign(0, spec, fence=1)).ok
            await _until(lambda: (r := b.replicas.get("r")) is not None and r.version >= 3)
            farm.kill(0)
            recovery = RecoveryTrace.begin(Trigger.PEER_LOST, rank=COORD)  # the coordinator's
            with recovery.phase(Phase.DETECT):
                pass
            assert (await farm.assign(2, spec, fence=2, fetch_from=[1], trace=recovery.inject())).ok
            # the coordinator ends the recovery when it hears the new attempt started
            await _until(lambda: (2, AttemptPhase.STARTED) in farm.coord.phases("r"))
            recovery.end("completed")
            await _until(lambda: bool(farm.coord.completed("r")))
            nursery.cancel_scope.cancel()
        spans = {s.name: s for s in exporter.get_finished_spans()}
        root = spans["supervise.recovery"]
        fetch, resume = spans["supervise.recovery.fetch"], spans["supervise.recovery.resume"]
        trace_id = root.context.trace_id
        assert fetch.context.trace_id == resume.context.trace_id == trace_id
        assert fetch.attributes is not None and resume.attributes is not None
        assert fetch.attributes["supervise.snapshot.source"] == "peer"
        assert fetch.attributes["supervise.bytes"] > 0
        assert resume.attributes["supervise.task.resumed_steps"] >= 2
        assert resume.attributes["supervise.node.rank"] == 2
        assert resume.end_time is not None and fetch.end_time is not None
        assert fetch.end_time <= resume.end_time <= root.end_time  # inside the recovery
    finally:
        tel.shutdown()


async def test_with_the_farms_control_plane_a_lost_nodes_task_resumes_and_completes(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The node side under the real coordinator (`FarmControl`, `FarmLink`): submitted,
    placed, run; its node lost mid-task -> requeued, resumed from a replica, completed once."""
    net = FakeNet()
    live = {0, 1, 2}
    nodes: dict[int, FarmNode] = {}
    scopes: dict[int, trio.CancelScope] = {}

    def leader() -> int | None:
        return min(live) if live else None

    async with trio.open_nursery() as nursery:
        for rank in range(3):
            control, node = _member(
                tmp_path, net, rank, leader=leader, live=lambda: sorted(live), cpu=2.0
            )
            nodes[rank] = node
            scope = scopes[rank] = trio.CancelScope()

            async def serve(
                task_status: trio.TaskStatus[None],
                control: FarmControl = control,
                node: FarmNode = node,
                scope: trio.CancelScope = scope,
            ) -> None:
                with scope:
                    async with trio.open_nursery() as inner:
                        await inner.start(control.run)
                        await inner.start(node.run)
                        task_status.started()

            await nursery.start(serve)
        client = FarmLink(net.link(7))  # type: ignore[arg-type]
        spec = _spec("cp", 6)
        got = await client.request(
            0, Submit(spec.to_bytes(), Resources(1.0).to_json()), expect=TaskReply
        )
        assert got.body.info["id"] == "cp"
        await _until(lambda: any("cp" in n.running for n in nodes.values()))
        (first,) = [r for r, n in nodes.items() if "cp" in n.running]
        await _until(lambda: farmfuncs.CALLS["s2"] == 1)
        live.discard(first)  # the node is lost: agent, attempt and RAM
        net.down.add(first)
        scopes[first].cancel()

        async def result() -> ResultReply | None:
            reply = await client.request(leader() or 0, ResultQuery("cp"), timeout=1.0)
            out = reply.body  # a FarmRefusal while a new coordinator takes over
            return out if isinstance(out, ResultReply) and out.state == "completed" else None

        with trio.fail_after(120):
            while (res := await result()) is None:  # noqa: ASYNC110 (polls the coordinator)
                await trio.sleep(0.5)
        assert decode(res.result or b"") == sum(i * i for i in range(6))
        assert all(farmfuncs.CALLS[f"s{i}"] == 1 for i in range(6)), farmfuncs.CALLS
        nursery.cancel_scope.cancel()


def test_holders_keep_every_unfinished_journal_and_the_newest_finished_ones() -> None:
    held = JournalReplicas(keep_done=2)
    for i in range(4):
        assert held.offer(Replica(f"d{i}", 1, 1, b"", b"x", done=True)) is None
        assert held.offer(Replica(f"u{i}", 1, 1, b"", b"x")) is None
    assert [t for t in ("d0", "d1", "d2", "d3") if held.get(t)] == ["d2", "d3"]
    assert all(held.get(f"u{i}") for i in range(4))
    assert held.offer(Replica("u0", 0, 9, b"", b"x")) == STALE_FENCE
    assert held.fence("d0") == 1  # forgotten journals' fences are still known


async def test_a_fetch_from_a_holder_slow_to_answer_is_asked_again(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: [1], 1: [], 2: []})
        _, b, c = [await farm.start(r) for r in (0, 1, 2)]
        spec = _spec("slow", 4)
        assert (await farm.assign(0, spec, fence=1)).ok
        await _until(lambda: (r := b.replicas.get("slow")) is not None and r.version >= 2)
        farm.kill(0)
        farm.net.frozen.add(1)  # the holder does not answer the first ask

        async def thaw() -> None:
            await trio.sleep(REQUEST_TIMEOUT_S + 0.2)  # past the first ask's deadline
            farm.net.frozen.discard(1)

        nursery.start_soon(thaw)
        before = dict(farmfuncs.CALLS)
        assert (await farm.assign(2, spec, fence=2, fetch_from=[1])).ok
        await _until(lambda: bool(farm.coord.completed("slow")))
        assert farmfuncs.CALLS["s0"] == before["s0"] == 1
        assert c.replicas.get("slow") is None
        nursery.cancel_scope.cancel()


async def test_each_attempt_sees_only_the_gpus_it_was_given(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: []})
        a = await farm.start(0, gpus=3)
        assert (await farm.assign(0, _spec("g1", 3), fence=1, gpus=2)).ok
        assert (await farm.assign(0, _spec("g2", 3), fence=1, gpus=1)).ok
        assert {a.running["g1"].gpus, a.running["g2"].gpus} == {(0, 1), (2,)}
        ack = await farm.assign(0, _spec("g3", 3), fence=1, gpus=1)
        assert not ack.ok and "GPU" in ack.reason
        await _until(lambda: bool(farm.coord.completed("g1")))
        assert (await farm.assign(0, _spec("g3", 3), fence=2, gpus=2)).ok
        assert a.running["g3"].gpus == (0, 1)  # given back when g1 ended
        nursery.cancel_scope.cancel()
    assert devices((0, 1)) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert devices(()) == {"CUDA_VISIBLE_DEVICES": ""}  # a task that asked for none sees none


async def test_a_restarted_farm_node_serves_its_workers_on_a_fresh_endpoint(
    tmp_path: Path,
) -> None:
    arenas = ArenaService(
        tmp_path / "shm",
        rule=RetentionRule(keep_last=1),
        budget=MemoryBudget(1 << 26),
        node="r0",
        anonymous=True,
        tokens=RankTokens(),
    )
    node = FarmNode(
        rank=0,
        link=FakeNet().link(0),
        wire=FakeNet().link(0),
        arenas=arenas,
        peers=[],
        coordinator=lambda: None,
        capacity={"cpu": 1.0},
        run_dir=tmp_path,
    )
    endpoints = []
    for _ in range(2):  # the node's supervisor restarts the child
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            assert isinstance(node.runner, WorkerRunner)
            endpoint = node.runner.host.endpoint
            assert Path(endpoint.removeprefix("ipc://")).exists()  # served by this incarnation
            endpoints.append(endpoint)
            nursery.cancel_scope.cancel()
    assert not Path(endpoints[-1].removeprefix("ipc://")).exists()


def test_a_node_runtime_builds_its_farm_node_once_with_its_group_peers(tmp_path: Path) -> None:
    ports = free_ports(3)
    config = NodeConfig(
        rank=1,
        nodes=[f"127.0.0.1:{p}" for p in ports],
        command=["true"],
        policy=Policy.from_dict({"replication": {"replicas": 2, "placement": "ring"}}),
        shm_dir=str(tmp_path / "shm"),
        run_dir=str(tmp_path),
    )
    rt = NodeRuntime(config)
    try:
        link = FakeNet().link(1)
        spec = rt.farm_node_child(link, coordinator=lambda: 0, capacity={"cpu": 4.0})
        node = rt.farm_node
        assert node is not None and spec.id == "farm_node"
        assert node.peers == (2,)  # ring of 2: rank 1 holds itself and rank 2
        assert node.arenas is rt.arenas and node.wire is rt.transport
        assert rt.farm_node_child(link, coordinator=lambda: 0, capacity={}) is not None
        assert rt.farm_node is node  # once per runtime: its arena hook stays
    finally:
        rt.close()
    assert group_peers(0, 1, 2, "group") == ()
    assert group_peers(0, 4, 2, "group") == (1,)


async def test_a_workers_commit_is_answered_once_the_group_peer_holds_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: [1], 1: [0]})
        a, b = [await farm.start(r) for r in (0, 1)]

        async def idle(run: Running) -> AttemptEnd:
            await trio.sleep_forever()
            raise AssertionError

        a.runner = idle
        assert (await farm.assign(0, _spec("w", 3), fence=1)).ok
        await _until(lambda: "w" in a.running)
        run = a.running["w"]
        # the worker's journal commits its first step (the version is local now)...
        journal = ArenaJournal(LocalOwner(a.arenas, run.shard), generation=1)
        farm.net.frozen.add(1)  # ...while its group peer is slow to answer

        async def thaw() -> None:
            await trio.sleep(1.0)
            farm.net.frozen.discard(1)

        nursery.start_soon(thaw)
        journal.commit(Commit(1, (StepRecord("s0", "w/s0", b"\\x00", 1),)))
        frame = p.encode_request(p.Commit(run.shard, "arena", 0, b""), 5)
        started = trio.current_time()
        await a.handle_worker(frame)  # the commit's reply
        assert trio.current_time() - started >= 1.0  # it waited for the peer
        held = b.replicas.get("w")
        assert held is not None and held.fence == 1  # which holds the version
        nursery.cancel_scope.cancel()


def _member(
    tmp_path: Path,
    net: FakeNet,
    rank: int,
    *,
    leader: Callable[[], int | None],
    live: Callable[[], list[int]],
    cpu: float,
) -> tuple[FarmControl, FarmNode]:
    """Farm node ``rank`` of three on ``net``: the real control plane and node side, tasks
    run in-process, its arenas under ``tmp_path``."""
    wire = net.link(rank)
    flink = FarmLink(wire)  # type: ignore[arg-type]
    control = FarmControl(
        flink,
        leader=leader,
        live=live,
        lease_s=LEASE,
        clock=trio.current_time,
        request_timeout=1.0,
    )
    runner = InProcessRunner()
    node = FarmNode(
        rank=rank,
        link=flink,
        wire=wire,
        arenas=ArenaService(
            tmp_path / f"shm{rank}",
            rule=RetentionRule(keep_last=2),
            budget=MemoryBudget(1 << 28),
            node=f"n{rank}",
            anonymous=True,
        ),
        peers=[r for r in range(3) if r != rank],
        coordinator=control.coordinator,
        capacity=Resources(cpu, 1 << 30, 0).to_json(),
        runner=runner,
        live=live,
    )
    runner.node = node
    return control, node


async def _slow_farm(
    tmp_path: Path, nursery: trio.Nursery, net: FakeNet
) -> tuple[dict[int, FarmControl], FarmLink]:
    """Three farm nodes under the real control plane on ``net``; rank 0 (the coordinator)
    has no room, so tasks run where their messages cross the (slow) wire. The controls,
    and a client's link."""
    controls: dict[int, FarmControl] = {}
    for rank in range(3):
        control, node = _member(
            tmp_path, net, rank, leader=lambda: 0, live=lambda: [0, 1, 2], cpu=2.0 if rank else 0.5
        )
        controls[rank] = control
        await nursery.start(control.run)
        await nursery.start(node.run)
    return controls, FarmLink(net.link(7))  # type: ignore[arg-type]


async def _run_once(controls: dict[int, FarmControl], client: FarmLink, steps: int) -> None:
    """Submit a ``steps``-step task; it completes with the right result, in one attempt, no
    loss, no step run twice."""
    spec = _spec("slow", steps)
    got = await client.request(
        0, Submit(spec.to_bytes(), Resources(1.0).to_json()), expect=TaskReply
    )
    assert got.body.info["id"] == "slow"

    async def result() -> ResultReply | None:
        reply = await client.request(0, ResultQuery("slow"), timeout=1.0)
        out = reply.body
        done = isinstance(out, ResultReply) and out.state not in ("pending", "assigned", "running")
        return out if done else None

    with trio.fail_after(300):
        while (res := await result()) is None:  # noqa: ASYNC110 (polls the coordinator)
            await trio.sleep(0.5)
    rec = controls[0].table.get("slow")
    assert res.state == "completed", (res, rec.error)
    assert decode(res.result or b"") == sum(i * i for i in range(steps))
    assert (rec.attempt, rec.losses) == (1, 0), rec.life.history
    assert all(farmfuncs.CALLS[f"s{i}"] == 1 for i in range(steps)), farmfuncs.CALLS


async def test_renewals_late_under_load_lose_no_task_and_run_no_step_twice(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Every renewal reaches the coordinator half a lease late (a loaded coordinator or
    link: the other messages flow): the node renews on its own cadence, each renewal counted
    from its ask, so the attempt keeps its lease, is never moved nor run twice (renewals sent
    one after the other, each awaited, used to let its lease lapse: commits refused, the task
    requeued as lost again and again)."""
    net = FakeNet()
    net.delays.delay[None, Renew] = LEASE / 2
    async with trio.open_nursery() as nursery:
        controls, client = await _slow_farm(tmp_path, nursery, net)
        await _run_once(controls, client, 12)
        nursery.cancel_scope.cancel()


async def test_a_finished_attempt_slow_to_report_is_renewed_until_its_end_is_taken(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A node's reports reach the coordinator 4 s late (its lease is 3 s; an answer waits for
    the table to be saved, slow under load): the attempt's end is reported within its
    deadline and the finished attempt is renewed until then, so the coordinator neither
    takes it for dropped nor runs the task again."""
    net = FakeNet()
    net.delays.delay[None, Update] = 4.0
    async with trio.open_nursery() as nursery:
        controls, client = await _slow_farm(tmp_path, nursery, net)
        await _run_once(controls, client, 3)
        nursery.cancel_scope.cancel()


async def test_a_write_while_the_lease_looks_lapsed_waits_for_a_renewal(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker's write when the attempt's renewals are late is not refused at once: the
    node renews and judges the write by the answer (renewed: served; stale: refused)."""
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: []})
        tokens = RankTokens()
        a = await farm.start(0, tokens)
        assert (await farm.assign(0, _spec("w", 50), fence=2)).ok
        run = a.running["w"]
        frame = p.encode_request(p.Begin(rank=run.shard), 9, tokens.issue(run.shard, 2))
        farm.net.delays.delay[None, Renew] = 1.0  # the answer takes a while
        run.renewed_at = trio.current_time() - LEASE  # lapsed: the renewals were late
        assert a.may_commit(run.shard) == LAPSED
        reply = await a.handle_worker(frame)
        assert reply is not None and b"refused" not in reply
        assert a.may_commit(run.shard) is None
        run.renewed_at = trio.current_time() - LEASE
        farm.coord.fences["w"] = 3  # meanwhile the task moved on: the renewal says stale
        reply = await a.handle_worker(frame)
        assert reply is not None and b"commit refused" in reply
        assert run.zombie  # killed: its writes refused from now on
        nursery.cancel_scope.cancel()


async def test_an_attempt_ended_by_refused_commits_is_said_dropped(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """No renewal gets through for a lease: the attempt's commits are refused, it ends
    without a report, and the node's next renewals say it dropped it (the coordinator moves
    it at once instead of waiting on a live node's lease)."""
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: []})
        a = await farm.start(0)
        farm.net.delays.delay[None, Renew] = 10 * LEASE  # never answered in time
        assert (await farm.assign(0, _spec("d", 50), fence=4)).ok
        await _until(lambda: "d" not in a.running)
        assert not farm.coord.phases("d") or all(
            ph in (AttemptPhase.STARTED, AttemptPhase.PROGRESS) for _, ph in farm.coord.phases("d")
        )
        del farm.net.delays.delay[None, Renew]
        await _until(lambda: any(("d", 4) in r.dropped for r in farm.coord.renewals))
        await _until(lambda: not a._dropped)  # said once heard
        nursery.cancel_scope.cancel()


async def test_a_finished_tasks_journal_shard_is_used_again(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node runs any number of tasks in its life: a shard given back when its task ended
    goes to the next task (its token revoked meanwhile), not only fresh numbers up to a cap."""
    monkeypatch.setattr(farm_node, "_SHARD_LIMIT", TASK_SHARD_BASE + 2)
    async with trio.open_nursery() as nursery:
        farm = Farm(tmp_path, nursery, {0: []})
        tokens = RankTokens()
        a = await farm.start(0, tokens)
        await _until(lambda: len(farm.coord.offers) == 1)
        shards = []
        for i in range(5):
            spec = _spec(f"r{i}", 2)
            assert (await farm.assign(0, spec, fence=1)).ok
            shards.append(a.running[spec.task_id].shard)
            token = tokens.issue(shards[-1], 1)
            await _until(lambda s=spec: bool(farm.coord.completed(s.task_id)))
            await _until(lambda: not a.arenas.ranks)  # the shard given back
            assert tokens.grant(token) is None  # its last worker's token no longer works
        assert set(shards) <= {TASK_SHARD_BASE, TASK_SHARD_BASE + 1}
        nursery.cancel_scope.cancel()
