"""Failure detection and membership: heartbeats, peer_lost / peer_back, root election."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from clusterkit import eventually

from supervise import InvalidValue
from supervise.cluster import Incoming, Transport
from supervise.cluster.failure_detector import (
    DetectorConfig,
    FailureDetector,
    LossCause,
    PeerBack,
    PeerLost,
    RootChanged,
)
from supervise.cluster.membership import Heartbeat, Membership

# ---- the sans-IO detector --------------------------------------------------------------


def test_config_validation() -> None:
    with pytest.raises(InvalidValue, match=r"peer_timeout = 1\.0: must be > heartbeat_interval"):
        DetectorConfig(interval=1.0, timeout=1.0)
    with pytest.raises(InvalidValue, match="phi_threshold"):
        DetectorConfig(phi_threshold=0)


def test_timeout_detection_and_return() -> None:
    det = FailureDetector(DetectorConfig(interval=1, timeout=5), [1, 2], now=0.0)
    assert det.live() == [1, 2]
    assert det.check(5.0) == []  # never heard from: presumed alive for twice the timeout
    assert det.heartbeat(1, incarnation=7, now=4.9) == []
    assert not det.heard(2) and det.heard(1)
    assert det.check(9.8) == []
    assert det.check(9.9) == [PeerLost(1, pytest.approx(5.0))]
    assert det.live() == [2]
    assert det.check(10.0) == [PeerLost(2, 10.0)]
    assert det.live() == []
    assert det.check(100) == []  # reported once
    assert det.heartbeat(1, incarnation=7, now=101) == [PeerBack(1, 7, restarted=False)]
    # lost before it was ever heard: which process that was is unknown, its RAM not assumed
    assert det.heartbeat(2, incarnation=3, now=101) == [PeerBack(2, 3, restarted=True)]
    assert det.live() == [1, 2]
    assert det.heartbeat(2, incarnation=3, now=102) == []


def test_new_incarnation_is_reported_even_without_a_timeout() -> None:
    det = FailureDetector(DetectorConfig(interval=1, timeout=5), [1], now=0.0)
    det.heartbeat(1, 10, 1.0)
    assert det.heartbeat(1, 10, 2.0) == []
    assert det.heartbeat(1, 11, 3.0) == [PeerBack(1, 11, restarted=True)]
    assert det.incarnation(1) == 11
    assert det.heartbeat(5, 1, 3.0) == []  # not a watched peer


def test_phi_accrual_suspects_before_the_hard_timeout() -> None:
    cfg = DetectorConfig(interval=1, timeout=30, phi_threshold=8)
    det = FailureDetector(cfg, [1], now=0.0)
    t = 0.0
    for _ in range(20):
        t += 1.0
        det.heartbeat(1, 1, t)
        assert det.check(t) == []
    assert det.phi(1, t + 1.0) < 1  # on time: no suspicion
    assert det.check(t + 1.3) == []
    lost = [det.check(t + 1 + 0.1 * i) for i in range(1, 60)]
    when = next(i for i, ev in enumerate(lost, 1) if ev)
    assert 1 + 0.1 * when < 30  # well before the hard timeout
    # a jittery peer earns more patience than a punctual one
    jittery = FailureDetector(cfg, [1], now=0.0)
    t = 0.0
    for i in range(20):
        t += 0.5 if i % 2 else 1.5
        jittery.heartbeat(1, 1, t)
    assert jittery.phi(1, t + 1.6) < det.phi(1, 21.0 + 0.6)


def test_next_deadline() -> None:
    det = FailureDetector(DetectorConfig(interval=1, timeout=5), [1, 2], now=0.0)
    det.heartbeat(1, 1, 3.0)
    assert det.next_deadline(3.0) == 8.0  # 1 heard at 3 s; 2 never heard: lost at 10 s
    det.check(8.0)
    assert det.next_deadline(8.0) == 10.0
    det.check(10.0)
    assert det.live() == [] and det.next_deadline(10.0) == 15.0


# ---- the service, on an in-memory network with virtual time ----------------------------


class FakeNet:
    """Delivers heartbeats between in-memory links; a partitioned rank sends and gets nothing."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.links: dict[int, FakeLink] = {}
        self.down: set[int] = set()


class FakeLink:
    def __init__(self, net: FakeNet, rank: int) -> None:
        self.net, self._rank = net, rank
        self.handler: Callable[[Incoming[Heartbeat]], Awaitable[object]] | None = None
        net.links[rank] = self

    @property
    def rank(self) -> int:
        return self._rank

    def handle(self, kind: Any, handler: Any, *, allow: Any = None) -> None:
        self.handler = handler

    def unhandle(self, kind: Any, handler: Any = None) -> None:
        self.handler = None

    def try_send(self, peer: int, message: object) -> bool:
        target = self.net.links.get(peer)
        if self._rank in self.net.down or peer in self.net.down or target is None:
            return False
        if target.handler is None:
            return False
        msg: Incoming[Any] = Incoming(
            body=message,
            kind="membership.heartbeat",
            sender=self._rank,
            frames=(),
            trace={},
            request_id=0,
        )
        self.net.nursery.start_soon(target.handler, msg)
        return True


async def test_membership_events_and_root(autojump_clock: Any) -> None:
    cfg = DetectorConfig(interval=1, timeout=5)
    async with trio.open_nursery() as nursery:
        net = FakeNet(nursery)
        ms: dict[int, Membership] = {}
        scopes: dict[int, trio.CancelScope] = {}

        async def start(r: int, incarnation: int) -> None:
            link = FakeLink(net, r)
            m = Membership(link, range(4), cfg, info=lambda: {"held": [r]}, incarnation=incarnation)
            scope = trio.CancelScope()

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with scope:
                    await m.run(task_status=task_status)

            await nursery.start(run)
            ms[r], scopes[r] = m, scope

        for r in range(4):
            await start(r, 100 + r)
        events = ms[3].subscribe()
        await trio.sleep(3)
        assert all(m.root == 0 for m in ms.values())
        assert ms[3].live() == [0, 1, 2, 3]
        assert ms[3].peer_info(1) == {"held": [1]}
        assert ms[0].is_root and not ms[3].is_root

        scopes[0].cancel()  # rank 0 dies
        net.down.add(0)
        with trio.fail_after(10):
            assert await events.receive() == PeerLost(0, pytest.approx(5, abs=1.01))
            assert await events.receive() == RootChanged(1, 0)
        await trio.sleep(1)
        assert all(ms[r].root == 1 for r in (1, 2, 3))
        assert not ms[3].is_alive(0)

        net.down.discard(0)
        await start(0, 999)  # a replacement process with the same rank
        with trio.fail_after(10):
            assert await events.receive() == PeerBack(0, 999, restarted=True)
            assert await events.receive() == RootChanged(0, 1)

        # a fast restart (below the timeout) is still reported: the peer lost its RAM
        scopes[2].cancel()
        await start(2, 1234)
        with trio.fail_after(10):
            assert await events.receive() == PeerBack(2, 1234, restarted=True)
        nursery.cancel_scope.cancel()


async def test_membership_needs_a_rank() -> None:
    with pytest.raises(ValueError, match="needs a transport with a rank"):
        Membership(Transport(rank=None), [0, 1])


# ---- the service over real zmq links ---------------------------------------------------


async def test_membership_over_transport() -> None:
    cfg = DetectorConfig(interval=0.05, timeout=3.0)
    a = Transport(rank=0, endpoint="127.0.0.1:0")
    b = Transport(rank=1, endpoint="127.0.0.1:0")
    async with a.running(), b.running():
        assert a.endpoint and b.endpoint
        a.set_peer(1, b.endpoint)
        b.set_peer(0, a.endpoint)
        async with trio.open_nursery() as n:
            ma = await n.start(Membership(a, [0, 1], cfg, info=lambda: {"v": [10]}).run)
            mb_scope = trio.CancelScope()

            async def run_b(task_status: trio.TaskStatus[Membership]) -> None:
                with mb_scope:
                    await Membership(b, [0, 1], cfg).run(task_status=task_status)

            mb = await n.start(run_b)
            events = ma.subscribe()
            await eventually(lambda: mb.peer_info(0) is not None)
            assert mb.peer_info(0) == {"v": [10]}
            # a peer never heard from gets twice the timeout: wait until rank 0 heard rank 1
            await eventually(lambda: ma.peer_info(1) is not None)
            mb_scope.cancel()  # rank 1 stops beating
            with trio.fail_after(20):
                assert await events.receive() == PeerLost(1, pytest.approx(3.0, abs=2))
            assert ma.live() == [0]
            n.cancel_scope.cancel()


def test_a_peer_declared_lost_by_its_lease_comes_back_by_heartbeat() -> None:
    det = FailureDetector(DetectorConfig(interval=1, timeout=5), [1], now=0.0)
    det.heartbeat(1, 7, 1.0)
    assert det.lose(1, 2.5, LossCause.LEASE) == [PeerLost(1, 1.5, cause=LossCause.LEASE)]
    assert det.live() == [] and det.lose(1, 3.0, LossCause.LEASE) == []  # said once
    assert det.check(100.0) == []  # already lost: the timeout says nothing more
    assert det.heartbeat(1, 7, 101.0) == [PeerBack(1, 7, restarted=False)]
    assert det.lose(9, 3.0, LossCause.LEASE) == []  # not a watched peer


async def test_a_pause_of_this_process_is_not_its_peers_silence(autojump_clock: Any) -> None:
    """SIGSTOP of a node past the peer timeout: when it runs again its peers' heartbeats are
    still on their way; it must not declare them lost (and lead alone on a stale view). A
    peer that stays silent after the pause is lost one timeout later, as ever."""
    cfg = DetectorConfig(interval=0.5, timeout=2)
    async with trio.open_nursery() as nursery:
        net = FakeNet(nursery)
        m = Membership(FakeLink(net, 0), [0, 1], cfg, incarnation=1)
        await nursery.start(m.run)
        events = m.subscribe()
        peer = FakeLink(net, 1)
        for seq in range(4):
            assert peer.try_send(0, Heartbeat(1, 7, seq))
            await trio.sleep(0.5)
        assert m.is_alive(1)
        autojump_clock.jump(10.0)  # the whole process stopped for 10 s: nothing ran
        await trio.sleep(0.3)  # running again; the peer's next heartbeat is on its way
        assert m.is_alive(1)
        assert peer.try_send(0, Heartbeat(1, 7, 4))
        await trio.sleep(1.0)
        assert m.is_alive(1)
        with trio.fail_after(cfg.timeout + 1):  # silence after the pause counts again
            assert await events.receive() == PeerLost(1, pytest.approx(2.0, abs=0.6))
        nursery.cancel_scope.cancel()


def test_an_excused_pause_gives_a_peer_heard_since_no_extra_time() -> None:
    det = FailureDetector(DetectorConfig(interval=0.5, timeout=2), [1, 2], now=0.0)
    det.heartbeat(1, 7, 0.0)
    det.heartbeat(2, 8, 0.0)
    det.heartbeat(2, 8, 10.0)  # heard as this process woke from a 10 s pause
    det.excuse(9.5, now=10.0)
    assert det.silence(1, 10.0) == pytest.approx(0.5)  # the pause is no silence of rank 1
    assert det.silence(2, 10.0) == 0.0
    assert det.check(11.6) == [PeerLost(1, pytest.approx(2.1))]
    assert det.check(12.1) == [PeerLost(2, pytest.approx(2.1))]  # not 9.5 s later


async def test_a_peer_whose_connection_closed_and_whose_port_refuses_is_lost_at_once() -> None:
    """Its agent killed, a peer's connection closes and its endpoint refuses connections:
    that says it is gone (`LossCause.REFUSED`), long before its heartbeats' timeout. A peer
    whose endpoint still answers (only the connection went) is left to its heartbeats."""
    from supervise.cluster.probe import refuses

    cfg = DetectorConfig(interval=0.05, timeout=60.0)  # the timeout never decides here
    probed: list[int] = []
    a = Transport(rank=0, endpoint="127.0.0.1:0")

    async def probe(rank: int) -> bool:
        probed.append(rank)
        endpoint = a.peers.get(rank)
        return endpoint is not None and await refuses(endpoint, 5.0)

    b = Transport(rank=1, endpoint="127.0.0.1:0")
    async with a.running():
        assert a.endpoint
        ma = Membership(a, [0, 1], cfg, probe=probe)
        a.on_rank_closed(ma.link_closed)
        async with trio.open_nursery() as n:
            b_scope = trio.CancelScope()
            endpoint = a.endpoint

            async def run_b() -> None:
                with b_scope:
                    async with b.running():
                        b.set_peer(0, endpoint)
                        await Membership(b, [0, 1], cfg).run()

            n.start_soon(run_b)
            await eventually(lambda: b.endpoint is not None)
            assert b.endpoint is not None
            a.set_peer(1, b.endpoint)
            await n.start(ma.run)
            events = ma.subscribe()
            await eventually(lambda: ma.peer_info(1) is not None)
            assert not await refuses(b.endpoint, 5.0)  # b listens
            b_scope.cancel()  # b's process gone: its sockets closed, its port free
            with trio.fail_after(20):
                lost = await events.receive()
            assert isinstance(lost, PeerLost) and lost.cause is LossCause.REFUSED, lost
            assert probed == [1] and ma.live() == [0]
            n.cancel_scope.cancel()


async def test_a_closed_connection_alone_loses_no_peer(autojump_clock: Any) -> None:
    """A probe that finds the endpoint answering, or a heartbeat meanwhile: no loss. Only a
    silent peer whose endpoint refuses is lost at once."""
    cfg = DetectorConfig(interval=1.0, timeout=30.0)
    answers = [False]

    async def probe(rank: int) -> bool:
        return answers[0]

    async with trio.open_nursery() as n:
        net = FakeNet(n)
        m0 = Membership(FakeLink(net, 0), [0, 1], cfg, probe=probe)
        await n.start(m0.run)
        await n.start(Membership(FakeLink(net, 1), [0, 1], cfg).run)
        events = m0.subscribe()
        await trio.sleep(3 * cfg.interval)
        m0.link_closed(1)
        await trio.sleep(3 * cfg.interval)
        assert m0.live() == [0, 1]  # its endpoint answers: left to its heartbeats
        answers[0] = True
        m0.link_closed(1)
        await trio.sleep(3 * cfg.interval)
        assert m0.live() == [0, 1]  # it beat again before the probe: connected anew
        net.down.add(1)
        m0.link_closed(1)
        with trio.fail_after(3 * cfg.interval):
            lost = await events.receive()
        assert isinstance(lost, PeerLost) and lost.cause is LossCause.REFUSED, lost
        n.cancel_scope.cancel()


async def test_a_node_says_where_it_listens_and_a_move_is_told_once(autojump_clock: Any) -> None:
    cfg = DetectorConfig(interval=1.0, timeout=30.0)
    moved: list[tuple[int, str]] = []
    async with trio.open_nursery() as n:
        net = FakeNet(n)
        m0 = Membership(
            FakeLink(net, 0), [0, 1], cfg, on_endpoint=lambda r, e: moved.append((r, e))
        )
        await n.start(m0.run)
        scope = trio.CancelScope()

        async def one(advertise: str) -> None:
            with scope:
                await Membership(FakeLink(net, 1), [0, 1], cfg, advertise=advertise).run()

        n.start_soon(one, "tcp://standby:7")
        await trio.sleep(5 * cfg.interval)
        assert moved == [(1, "tcp://standby:7")]  # said once, however many beats
        scope.cancel()
        scope = trio.CancelScope()
        n.start_soon(one, "tcp://home:1")  # node 1 again, at its own address
        await trio.sleep(5 * cfg.interval)
        assert moved == [(1, "tcp://standby:7"), (1, "tcp://home:1")]
        n.cancel_scope.cancel()
