"""The worker's view of the arena owner: in-process (standalone) or the node agent over zmq.

Both expose the same small synchronous interface, so the Snapshotter does not care who owns
its arena. ``AgentClient.heartbeat`` never blocks: when the socket is busy or the agent is
slow the heartbeat is coalesced into the next one or dropped.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import zmq

from supervise.snapshot import protocol as p
from supervise.snapshot.arena import Arena
from supervise.snapshot.errors import AgentUnavailable, ProtocolError, SnapshotError
from supervise.snapshot.manifest import Manifest
from supervise.snapshot.protocol import AGENT_ENV, TOKEN_ENV
from supervise.snapshot.retention import VersionInfo
from supervise.snapshot.service import ArenaService

__all__ = ["AGENT_ENV", "TOKEN_ENV", "AgentClient", "LocalOwner", "Owner"]


@attrs.frozen(slots=True)
class Slot:
    """A slot handed to the worker to write into."""

    arena: Arena
    slot: int

    @property
    def name(self) -> str:
        """The arena's identity on the wire (its path)."""
        return str(self.arena.path)


@attrs.frozen(slots=True)
class RestoreCandidate:
    """A version the worker may load, with its slot and decoded manifest."""

    info: VersionInfo
    slot: Slot
    manifest: Manifest


@attrs.frozen(slots=True)
class Greeting:
    """What the owner answers to ``hello``."""

    policy: Mapping[str, Any]
    versions: list[VersionInfo]


class Owner(Protocol):
    """Who owns a worker's arena and its committed pointers."""

    rank: int

    def hello(self, hello: p.Hello) -> Greeting: ...
    def attach(self, nbytes: int, manifest_capacity: int) -> Arena: ...
    def begin(self) -> Slot | None: ...
    def commit(self, slot: Slot, manifest: bytes, source: str = "local") -> None: ...
    def abort(self, slot: Slot) -> None: ...
    def heartbeat(self, step: int, metrics: Mapping[str, float]) -> None: ...
    def pause(self, paused: bool) -> None: ...
    def restore(self, which: str | int) -> list[RestoreCandidate]: ...
    def restored(self, step: int) -> None: ...
    def corrupt(self, step: int, reason: str) -> None: ...
    def versions(self) -> list[VersionInfo]: ...
    def close(self) -> None: ...


class LocalOwner:
    """An in-process ArenaService (the standalone Snapshotter's owner)."""

    def __init__(self, service: ArenaService, rank: int) -> None:
        self.service = service
        self.rank = rank

    def hello(self, hello: p.Hello) -> Greeting:
        self.service.hello(hello)
        return Greeting(self.service.policy, self.service.versions(self.rank))

    def attach(self, nbytes: int, manifest_capacity: int) -> Arena:
        return self.service.attach(self.rank, nbytes, manifest_capacity)

    def begin(self) -> Slot | None:
        got = self.service.begin(self.rank)
        return None if got is None else Slot(self.service.arena(got[0]), got[1])

    def commit(self, slot: Slot, manifest: bytes, source: str = "local") -> None:
        self.service.commit(self.rank, slot.name, slot.slot, manifest, source=source)

    def abort(self, slot: Slot) -> None:
        self.service.abort(self.rank, slot.name, slot.slot)

    def heartbeat(self, step: int, metrics: Mapping[str, float]) -> None:
        self.service.heartbeat(self.rank, step, metrics)

    def pause(self, paused: bool) -> None:
        self.service.pause(self.rank, paused)

    def restore(self, which: str | int) -> list[RestoreCandidate]:
        return [
            RestoreCandidate(
                c.info, Slot(self.service.arena(c.arena), c.slot), Manifest.from_bytes(c.manifest)
            )
            for c in self.service.restore(self.rank, which)
        ]

    def restored(self, step: int) -> None:
        self.service.restored(self.rank, step)

    def corrupt(self, step: int, reason: str) -> None:
        self.service.corrupt(self.rank, step, reason)

    def versions(self) -> list[VersionInfo]:
        return self.service.versions(self.rank)

    def close(self) -> None:
        self.service.close()


class AgentClient:
    """The worker side of the local protocol: a zmq DEALER talking to the agent's ROUTER.

    Every request carries ``token`` (None: `TOKEN_ENV` from the environment, which the agent
    sets for the worker of ``rank``): the agent serves this client for that rank only."""

    def __init__(
        self, endpoint: str, rank: int, *, token: str | None = None, timeout: float = 30.0
    ) -> None:
        if not endpoint or "://" not in endpoint:
            raise SnapshotError(
                f"{AGENT_ENV}={endpoint!r} is not a zmq endpoint (e.g. ipc:///tmp/agent.sock)"
            )
        self.endpoint = endpoint
        self.rank = rank
        self._token = os.environ.get(TOKEN_ENV, "") if token is None else token
        self.timeout = timeout
        self._ctx: Any = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 64)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._arenas: dict[str, Arena] = {}
        self._pending_beat: bytes | None = None

    def _call(self, req: p.Request) -> dict[str, Any]:
        with self._lock:
            self._flush_beat()
            rid = next(self._ids)
            try:
                self._sock.send(p.encode_request(req, rid, self._token), zmq.NOBLOCK)
            except zmq.Again:
                raise AgentUnavailable(
                    f"agent at {self.endpoint} is not accepting requests ({req.OP})"
                ) from None
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(left * 1000, zmq.POLLIN):
                    raise AgentUnavailable(
                        f"agent at {self.endpoint} did not answer {req.OP!r} within "
                        f"{self.timeout:g} s"
                    )
                reply = p.decode_reply(self._sock.recv())
                if reply.get("id") == rid:
                    break
        if not reply["ok"]:
            raise SnapshotError(f"agent refused {req.OP!r}: {reply.get('error')}")
        return reply

    def _flush_beat(self) -> None:
        if self._pending_beat is not None:
            try:
                self._sock.send(self._pending_beat, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._pending_beat = None

    def _arena(self, name: str) -> Arena:
        a = self._arenas.get(name)
        if a is None:
            try:
                a = self._arenas[name] = Arena.open(name)
            except OSError as exc:
                raise SnapshotError(f"cannot map the agent's arena {name}: {exc}") from None
        return a

    def hello(self, hello: p.Hello) -> Greeting:
        r = self._call(hello)
        policy = r.get("policy")
        if not isinstance(policy, dict):
            raise ProtocolError("hello reply carries no policy map")
        return Greeting(policy, [p.info_from_wire(v) for v in r.get("versions", [])])

    def attach(self, nbytes: int, manifest_capacity: int) -> Arena:
        r = self._call(p.Attach(self.rank, nbytes, manifest_capacity))
        return self._arena(_str(r, "arena"))

    def begin(self) -> Slot | None:
        r = self._call(p.Begin(self.rank))
        if r.get("arena") is None:
            return None
        return Slot(self._arena(_str(r, "arena")), int(r["slot"]))

    def commit(self, slot: Slot, manifest: bytes, source: str = "local") -> None:
        self._call(p.Commit(self.rank, slot.name, slot.slot, manifest, source))

    def abort(self, slot: Slot) -> None:
        self._call(p.Abort(self.rank, slot.name, slot.slot))

    def heartbeat(self, step: int, metrics: Mapping[str, float]) -> None:
        """Send without waiting; if a request is in flight or the queue is full, keep only the
        newest heartbeat for later. Never blocks."""
        frame = p.encode_request(p.Heartbeat(self.rank, step, dict(metrics)), 0, self._token)
        if not self._lock.acquire(blocking=False):
            self._pending_beat = frame
            return
        try:
            self._pending_beat = frame
            self._flush_beat()
        finally:
            self._lock.release()

    def pause(self, paused: bool) -> None:
        """Tell the agent that a long phase starts (``paused``) or ended; answered, so the
        agent knows before the phase runs."""
        self._call(p.Pause(self.rank, paused))

    def restore(self, which: str | int) -> list[RestoreCandidate]:
        r = self._call(p.Restore(self.rank, which))
        out = []
        for c in r.get("candidates", []):
            out.append(
                RestoreCandidate(
                    p.info_from_wire(c["info"]),
                    Slot(self._arena(str(c["arena"])), int(c["slot"])),
                    Manifest.from_bytes(c["manifest"]),
                )
            )
        return out

    def restored(self, step: int) -> None:
        self._call(p.Restored(self.rank, step))

    def corrupt(self, step: int, reason: str) -> None:
        self._call(p.Corrupt(self.rank, step, reason))

    def versions(self) -> list[VersionInfo]:
        r = self._call(p.Versions(self.rank))
        return [p.info_from_wire(v) for v in r.get("versions", [])]

    def close(self) -> None:
        with self._lock:
            self._flush_beat()
            self._sock.close(linger=0)
            for a in self._arenas.values():
                a.close()
            self._arenas.clear()


def _str(reply: Mapping[str, Any], key: str) -> str:
    v = reply.get(key)
    if not isinstance(v, str):
        raise ProtocolError(f"reply field {key!r} is not a string: {v!r}")
    return v
