"""A farm node's side of task journal replication (kinds ``farm.journal*``): it holds its
group peers' journals (`JournalReplicas`, fenced), answers their pushes and fetches, pushes
its own tasks' versions to them and fetches a task's journal from the ranks an assignment
names. A push or fetch that carries a newer fence than a task's attempt here is news for the
node (``on_newer``): that attempt is a zombie."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import structlog
import trio

from supervise.cluster import Reply
from supervise.cluster.errors import ClusterError
from supervise.tasks.arena_journal import unpack
from supervise.tasks.farm_messages import STALE_FENCE, Ack
from supervise.tasks.journal_replica import (
    JournalFetch,
    JournalHeld,
    JournalPush,
    JournalReplicas,
    Replica,
    verified,
)

log = structlog.get_logger("supervise.agents.farm_node")

REQUEST_TIMEOUT_S = 2.0
"""Deadline of one request of the farm node (a push, a fetch, an update, a renewal)."""
FETCH_ROUNDS = 2
"""Rounds of asking the ranks an assignment names for the task's journal."""
PEER_BACKOFF_S = 5.0
"""A group peer that did not take a journal push is skipped this long (membership says more)."""


class Wire(Protocol):
    """What journal replication needs of the agent's transport (payload frames)."""

    def handle(self, kind: type[Any], handler: Callable[..., Any]) -> None: ...
    async def request(
        self,
        peer: int,
        message: object,
        frames: Sequence[Any] = (),
        *,
        trace: Any = None,
        timeout: float = 5.0,  # noqa: ASYNC109
        expect: type[Any] | None = None,
    ) -> Any: ...


class JournalPeers:
    """Journals held for ``peers`` and pushed to them; ``own(task_id)``: the newest version
    of a task's journal in this node's arenas; ``on_newer(task_id, fence)``: a newer fence
    was heard for a task."""

    def __init__(
        self,
        *,
        wire: Wire,
        peers: Sequence[int],
        own: Callable[[str], Replica | None],
        on_newer: Callable[[str, int], None],
        live: Callable[[], Iterable[int]] | None = None,
    ) -> None:
        self.wire = wire
        self.peers = tuple(peers)
        self.own = own
        self.on_newer = on_newer
        self.live = live
        self.replicas = JournalReplicas()
        self.refused_pushes = 0  # journal versions from zombies refused here (tests, status)
        self._silent: dict[int, float] = {}  # peer -> when it last failed to take a push

    def install(self) -> None:
        """Answer peers' pushes and fetches."""
        self.wire.handle(JournalPush, self._on_push)
        self.wire.handle(JournalFetch, self._on_fetch)

    def best(self, task_id: str) -> Replica | None:
        """The newest journal of ``task_id`` this node has: its own, or a peer's replica."""
        found = [r for r in (self.own(task_id), self.replicas.get(task_id)) if r is not None]
        return max(found, key=lambda r: r.order) if found else None

    async def _on_push(self, msg: Any) -> object:
        push: JournalPush = msg.body
        if msg.sender is not None:
            self._silent.pop(msg.sender, None)  # it answers again
        data = b"".join(bytes(b) for b in msg.buffers)
        try:
            verified(push.task_id, push.manifest, data)
        except ValueError as exc:
            return Ack(False, str(exc))
        try:
            _, outcome = unpack(data)
        except Exception as exc:  # checksummed, yet not a journal: refused, never held
            return Ack(False, f"task {push.task_id}: not a journal ({type(exc).__name__})")
        done = outcome is not None and outcome.ok
        why = self.replicas.offer(
            Replica(push.task_id, push.fence, push.version, push.manifest, data, done)
        )
        if why is not None:
            self.refused_pushes += 1
            log.warning(
                "refused a journal push", task=push.task_id, fence=push.fence, sender=msg.sender
            )
            return Ack(False, why)
        self.on_newer(push.task_id, push.fence)  # an attempt here with an older one is a zombie
        return Ack(True)

    async def _on_fetch(self, msg: Any) -> object:
        f: JournalFetch = msg.body
        self.replicas.learn(f.task_id, f.fence)
        self.on_newer(f.task_id, f.fence)
        best = self.best(f.task_id)
        if best is None:
            return JournalHeld(f.task_id)
        return Reply(
            JournalHeld(f.task_id, True, best.fence, best.version, best.manifest), [best.data]
        )

    async def fetch(self, task_id: str, fence: int, ranks: Sequence[int]) -> Replica | None:
        """The newest replica of the task among ``ranks``, asked at once (None: none has
        one); asked once more when some did not answer and none had it."""
        found: list[Replica] = []
        failed: list[int] = []
        for round_ in range(FETCH_ROUNDS):
            failed.clear()
            async with trio.open_nursery() as nursery:
                for rank in ranks:
                    nursery.start_soon(self._fetch_one, task_id, fence, rank, found, failed)
            if found or not failed:
                break
            if round_ + 1 < FETCH_ROUNDS:
                await trio.sleep(0.5)
        return max(found, key=lambda r: r.order) if found else None

    async def _fetch_one(
        self, task_id: str, fence: int, rank: int, found: list[Replica], failed: list[int]
    ) -> None:
        try:
            reply = await self.wire.request(
                rank,
                JournalFetch(task_id, fence),
                timeout=REQUEST_TIMEOUT_S,
                expect=JournalHeld,
            )
        except ClusterError as exc:
            log.info("journal fetch failed", task=task_id, peer=rank, error=str(exc))
            failed.append(rank)
            return
        held: JournalHeld = reply.body
        if not held.found:
            return
        data = b"".join(bytes(b) for b in reply.buffers)
        try:
            verified(task_id, held.manifest, data)
        except ValueError as exc:
            log.warning("fetched journal unusable", task=task_id, error=str(exc))
            return
        found.append(Replica(task_id, held.fence, held.version, held.manifest, data))

    def reachable(self) -> list[int]:
        """The group peers worth a push now: alive, and none that just failed to answer."""
        now = trio.current_time()
        alive = set(self.peers if self.live is None else self.live())
        return [
            peer
            for peer in self.peers
            if peer in alive and now - self._silent.get(peer, -PEER_BACKOFF_S) >= PEER_BACKOFF_S
        ]

    async def push(self, replica: Replica) -> tuple[frozenset[int], bool]:
        """Push ``replica`` to every reachable group peer at once; the peers that took it,
        and whether one refused it as stale (the attempt that wrote it is a zombie)."""
        acked: set[int] = set()
        stale: list[int] = []
        async with trio.open_nursery() as nursery:
            for peer in self.reachable():
                nursery.start_soon(self._push_one, peer, replica, acked, stale)
        return frozenset(acked), bool(stale)

    async def _push_one(
        self, peer: int, replica: Replica, acked: set[int], stale: list[int]
    ) -> None:
        try:
            reply = await self.wire.request(
                peer,
                JournalPush(replica.task_id, replica.fence, replica.version, replica.manifest),
                [replica.data],
                timeout=REQUEST_TIMEOUT_S,
                expect=Ack,
            )
        except ClusterError as exc:
            log.info("journal push failed", task=replica.task_id, peer=peer, error=str(exc))
            self._silent[peer] = trio.current_time()
            return
        self._silent.pop(peer, None)
        ack: Ack = reply.body
        if ack.ok:
            acked.add(peer)
        elif ack.reason == STALE_FENCE:
            stale.append(peer)
