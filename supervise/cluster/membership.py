"""Membership: heartbeats between node agents, peer_lost / peer_back, and the root.

Every node sends a heartbeat to every peer each ``heartbeat_interval`` (best effort: a link that
cannot take it right now skips it, so a dead peer never queues them). The failure detector
(:mod:`supervise.cluster.failure_detector`) turns arrivals and silences into events, and every
node knows the root: the lowest live rank (itself included). Heartbeats carry an incarnation
number (new per process), so a peer that restarted is reported even if it came back before its
timeout, and a small ``info`` map (for example the versions a node holds).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs
import structlog
import trio

from supervise.cluster.failure_detector import (
    DetectorConfig,
    Event,
    FailureDetector,
    LossCause,
    PeerBack,
    PeerLost,
    RootChanged,
)
from supervise.cluster.messages import message_kind
from supervise.cluster.transport import Incoming

log = structlog.get_logger("supervise.cluster.membership")
ENDPOINT_INFO = "endpoint"
"""The heartbeat info key a node says where it listens under (``advertise``)."""
# A new agent whose first heartbeat found a peer's link still connecting beats again this soon.
_EARLY_RETRY = 0.02

__all__ = ["Heartbeat", "Membership", "PeerBack", "PeerLost", "RootChanged"]


@message_kind("membership.heartbeat")
@attrs.frozen(slots=True)
class Heartbeat:
    """I am alive: rank, process incarnation, sequence number, and a small info map."""

    rank: int
    incarnation: int
    seq: int
    info: dict[str, Any] = attrs.field(factory=dict)


class HeartbeatLink(Protocol):
    """What membership needs of a transport."""

    @property
    def rank(self) -> int | None: ...

    def handle(
        self,
        kind: type[Heartbeat],
        handler: Callable[[Incoming[Heartbeat]], Awaitable[object]],
        *,
        allow: Callable[[Heartbeat, int | None], str | None] | None = None,
    ) -> None: ...

    def unhandle(self, kind: type[Any], handler: Callable[..., Any] | None = None) -> None: ...

    def try_send(self, peer: int, message: object) -> bool: ...


def _beats_for_itself(hb: Heartbeat, sender: int | None) -> str | None:
    """A heartbeat speaks only for its sender: a client (no rank) or another node is refused."""
    if sender != hb.rank:
        who = "a client" if sender is None else f"node {sender}"
        return f"{who} sent a heartbeat for node {hb.rank}"
    return None


class Membership:
    """Heartbeats and failure detection for one node; run it with :meth:`run`."""

    def __init__(
        self,
        link: HeartbeatLink,
        peers: Iterable[int],
        config: DetectorConfig | None = None,
        *,
        info: Callable[[], Mapping[str, Any]] | None = None,
        incarnation: int | None = None,
        probe: Callable[[int], Awaitable[bool]] | None = None,
        advertise: str | None = None,
        on_endpoint: Callable[[int, str], None] | None = None,
    ) -> None:
        if link.rank is None:
            raise ValueError("membership needs a transport with a rank (not a client)")
        self.rank: int = link.rank
        self.config = config or DetectorConfig()
        self.incarnation = incarnation if incarnation is not None else secrets.randbits(62)
        self._link = link
        self._peers = sorted({int(p) for p in peers} - {self.rank})
        self._info = info
        self._infos: dict[int, Mapping[str, Any]] = {}
        self._detector: FailureDetector | None = None
        self._root = min([self.rank, *self._peers])
        self._subscribers: list[trio.MemorySendChannel[Event]] = []
        self._seq = 0
        # after a peer's connection closed: whether its endpoint refuses connections now
        self._probe = probe
        self._probing: set[int] = set()
        self._nursery: trio.Nursery | None = None
        # where each node says it listens: a rank served elsewhere now (a standby took it, a
        # replacement came back at the rank's own address) is sent to there (`on_endpoint`)
        self._advertise = advertise
        self._on_endpoint = on_endpoint
        self._endpoints: dict[int, str] = {}

    @property
    def _pause_limit(self) -> float:
        """A gap between two runs of the watch loop (at most a heartbeat interval apart when
        this process runs) longer than this is a pause of this process, not of its peers."""
        return max(3 * self.config.interval, self.config.timeout / 2)

    @classmethod
    def from_policy(cls, link: HeartbeatLink, peers: Iterable[int], policy: Any) -> Membership:
        """Read ``policy.cluster.heartbeat_interval`` / ``peer_timeout``."""
        cluster = policy.cluster
        config = DetectorConfig(
            interval=float(cluster.heartbeat_interval), timeout=float(cluster.peer_timeout)
        )
        return cls(link, peers, config)

    # ---- queries -------------------------------------------------------------------------

    @property
    def root(self) -> int:
        """The lowest live rank, this node included."""
        return self._root

    @property
    def is_root(self) -> bool:
        return self._root == self.rank

    @property
    def peers(self) -> list[int]:
        return list(self._peers)

    def live(self) -> list[int]:
        """Live ranks, this node included (peers not yet timed out count as live)."""
        det = self._detector
        others = self._peers if det is None else det.live()
        return sorted([self.rank, *others])

    def is_alive(self, rank: int) -> bool:
        if rank == self.rank:
            return True
        det = self._detector
        return rank in self._peers if det is None else det.is_alive(rank)

    def silence(self, rank: int) -> float:
        """Seconds since ``rank``'s last heartbeat (or since watching began); 0 for this node,
        infinity for a rank that is not a peer."""
        if rank == self.rank:
            return 0.0
        det = self._detector
        return math.inf if det is None else det.silence(rank, trio.current_time())

    def peer_info(self, rank: int) -> Mapping[str, Any] | None:
        """The info map from the peer's latest heartbeat."""
        return self._infos.get(rank)

    def quiet_for(self) -> float:
        """The longest silence of a live peer, in seconds (0 with no peer or no detector):
        a peer loss in the making, before ``peer_timeout`` says so."""
        det = self._detector
        if det is None:
            return 0.0
        now = trio.current_time()
        return max((det.silence(r, now) for r in det.live()), default=0.0)

    def phi(self, rank: int) -> float:
        det = self._detector
        return math.inf if det is None else det.phi(rank, trio.current_time())

    def subscribe(self, buffer: int = 256) -> trio.MemoryReceiveChannel[Event]:
        """A channel of every later event; close it to unsubscribe."""
        send, recv = trio.open_memory_channel[Event](buffer)
        self._subscribers.append(send)
        return recv

    def lose(self, rank: int, cause: LossCause) -> None:
        """Declare peer ``rank`` lost now for ``cause`` (with ``--store``: its lease ended),
        whichever comes first of that and its heartbeats' timeout."""
        det = self._detector
        if det is None or rank == self.rank:
            return
        events = det.lose(rank, trio.current_time(), cause)
        if events:
            self._emit(events)
            self._update_root()

    def link_closed(self, rank: int) -> None:
        """The connection peer ``rank`` spoke on closed: unless it is heard again within a
        heartbeat interval (messages it sent before are read meanwhile), its endpoint is
        probed, and a refused connect declares it lost at once (`LossCause.REFUSED`): its
        process is gone. A host that went down answers nothing: its heartbeats' timeout
        says it, as before."""
        if self._probe is None or self._nursery is None or rank not in self._peers:
            return
        if rank not in self._probing:
            self._probing.add(rank)
            self._nursery.start_soon(self._probe_closed, rank, trio.current_time())

    async def _probe_closed(self, rank: int, closed_at: float) -> None:
        assert self._probe is not None
        try:
            await trio.sleep(self.config.interval)
            if self._settled(rank, closed_at):
                return
            refused = await self._probe(rank)
            if refused and not self._settled(rank, closed_at):
                log.warning("peer's connection closed and its endpoint refuses", peer=rank)
                self.lose(rank, LossCause.REFUSED)
        finally:
            self._probing.discard(rank)

    def _settled(self, rank: int, t: float) -> bool:
        """Whether ``rank`` was heard since ``t``, or is lost already: nothing to probe."""
        det = self._detector
        now = trio.current_time()
        return det is None or not det.is_alive(rank) or now - det.silence(rank, now) > t

    # ---- running -------------------------------------------------------------------------

    def _emit(self, events: list[Event]) -> None:
        for ev in events:
            fields = {k: v for k, v in attrs.asdict(ev).items() if k != "kind"}
            log.info(ev.kind, node=self.rank, **fields)
            for ch in list(self._subscribers):
                try:
                    ch.send_nowait(ev)
                except trio.WouldBlock:
                    log.warning("membership subscriber too slow; event dropped", kind=ev.kind)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.remove(ch)

    def _update_root(self) -> None:
        root = min(self.live())
        if root != self._root:
            previous, self._root = self._root, root
            self._emit([RootChanged(root, previous)])

    async def _on_heartbeat(self, msg: Incoming[Heartbeat]) -> None:
        hb = msg.body
        det = self._detector
        if det is None or hb.rank == self.rank or hb.rank not in self._peers:
            return
        if msg.sender != hb.rank:  # (the transport refuses it first: `_beats_for_itself`)
            return
        self._infos[hb.rank] = hb.info
        endpoint = hb.info.get(ENDPOINT_INFO)
        if isinstance(endpoint, str) and endpoint != self._endpoints.get(hb.rank):
            self._endpoints[hb.rank] = endpoint
            if self._on_endpoint is not None:
                self._on_endpoint(hb.rank, endpoint)
        events = det.heartbeat(hb.rank, hb.incarnation, trio.current_time())
        if events:
            self._emit(events)
            self._update_root()

    def _beat(self) -> bool:
        """One heartbeat to every peer; False when a peer's link took none (not connected)."""
        self._seq += 1
        info = dict(self._info()) if self._info is not None else {}
        if self._advertise is not None:
            info[ENDPOINT_INFO] = self._advertise
        hb = Heartbeat(self.rank, self.incarnation, self._seq, info)
        sent = True
        for peer in self._peers:
            try:
                sent = self._link.try_send(peer, hb) is not False and sent
            except trio.ClosedResourceError:
                return True
        return sent

    async def run(
        self, *, task_status: trio.TaskStatus[Membership] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send heartbeats and watch peers until cancelled."""
        now = trio.current_time()
        self._detector = FailureDetector(self.config, self._peers, now)
        self._link.handle(Heartbeat, self._on_heartbeat, allow=_beats_for_itself)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                await self._watch(now)
        finally:
            self._nursery = None
            self._link.unhandle(Heartbeat, self._on_heartbeat)
            self._detector = None
            for ch in self._subscribers:
                ch.close()
            self._subscribers.clear()

    async def _watch(self, now: float) -> None:
        """Beat and check, for good."""
        assert self._detector is not None
        next_beat = now
        early = now + 2 * self.config.interval  # a new agent's links are connecting
        awake = now  # when this loop last ran: a longer gap is a pause of this process
        while True:
            now = trio.current_time()
            gap = now - awake
            if gap > self._pause_limit:
                self._detector.excuse(gap - self.config.interval, now)
                log.warning(
                    "this process was paused: peers' silence in that time not counted",
                    seconds=round(gap, 3),
                )
            awake = now
            if now >= next_beat:
                sent = self._beat()
                # a new agent's first beats that found a link still connecting go again
                # soon: its peers hear it (a replacement, a standby taking over) at once
                soon = not sent and now < early
                next_beat = now + (
                    min(_EARLY_RETRY, self.config.interval) if soon else self.config.interval
                )
            events = self._detector.check(now)
            if events:
                self._emit(events)
                self._update_root()
            wake_at = min(next_beat, self._detector.next_deadline(now))
            await trio.sleep_until(wake_at)
