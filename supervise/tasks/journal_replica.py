"""Task journals held for group peers, fenced: the node side's replication of `ArenaJournal`
versions (kinds ``farm.journal*``).

A farm node pushes each newly committed version of a task's journal (its manifest, and its
bytes as one payload frame) to its group peers; a peer keeps the newest version per task in
RAM and hands it to whoever resumes the task (itself, or a node that fetches it). Every
version carries the fence of the attempt that wrote it (the manifest's ``generation``), and a
holder refuses anything older than the newest fence it knows for the task: a zombie attempt
(its node frozen past its lease, the task already moved) can never get a commit into a replica.
Pure logic and message shapes; no I/O.
"""

from __future__ import annotations

from typing import Any

import attrs

from supervise.cluster.messages import message_kind
from supervise.snapshot.checksum import mismatches
from supervise.snapshot.manifest import Manifest
from supervise.tasks.farm_messages import STALE_FENCE


def _ge0(_inst: object, attr: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"{attr.name} = {value!r}: must be >= 0")


def _non_empty(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attr.name} = {value!r}: must be a non-empty string")


@message_kind("farm.journal")
@attrs.frozen(slots=True)
class JournalPush:
    """Node -> group peer: version ``version`` of a task's journal written under ``fence``; the
    journal's bytes are the payload's one frame. Reply: `farm_messages.Ack` (``STALE_FENCE``
    when the holder knows a newer fence for the task)."""

    task_id: str = attrs.field(validator=_non_empty)
    fence: int = attrs.field(validator=_ge0)
    version: int = attrs.field(validator=_ge0)
    manifest: bytes


@message_kind("farm.journal_fetch")
@attrs.frozen(slots=True)
class JournalFetch:
    """Node -> holder: the newest replica of ``task_id`` you hold, for an attempt under
    ``fence`` (the holder learns that fence: older pushes are refused from now on).
    Reply: `JournalHeld`."""

    task_id: str = attrs.field(validator=_non_empty)
    fence: int = attrs.field(validator=_ge0)


@message_kind("farm.journal_held")
@attrs.frozen(slots=True)
class JournalHeld:
    """Reply to `JournalFetch`: ``found`` with the replica's fence, version and manifest (its
    bytes are the payload's one frame), or not found."""

    task_id: str
    found: bool = False
    fence: int = 0
    version: int = 0
    manifest: bytes = b""


#: The journal replication kinds, for a transport's registry.
KINDS: tuple[type[Any], ...] = (JournalPush, JournalFetch, JournalHeld)


@attrs.frozen(slots=True)
class Replica:
    """One task's journal version as held: its fence, version, manifest and bytes."""

    task_id: str
    fence: int
    version: int
    manifest: bytes
    data: bytes
    done: bool = False  # the journal holds the task's result: kept only while room is left

    @property
    def order(self) -> tuple[int, int]:
        """Newer is greater: a higher fence first, then a higher version."""
        return (self.fence, self.version)


def verified(task_id: str, manifest: bytes, data: bytes | memoryview) -> Manifest:
    """The manifest of a pushed or fetched journal version whose bytes match it; ValueError
    (one line) otherwise."""
    m = Manifest.from_bytes(manifest)
    if m.nbytes != len(data):
        raise ValueError(f"task {task_id}: journal of {len(data)} bytes, manifest says {m.nbytes}")
    bad = mismatches(m, memoryview(data))
    if bad:
        raise ValueError(f"task {task_id}: journal version {m.step} fails its checksum")
    return m


KEEP_DONE = 256
"""Journals of finished tasks a holder keeps (oldest dropped first; unfinished ones stay)."""


class JournalReplicas:
    """The newest journal version per task held for peers, and the newest fence known per
    task (from assignments, stops, fetches and pushes): older writes are refused. Journals
    that hold their task's result go first when more than ``keep_done`` are held."""

    def __init__(self, keep_done: int = KEEP_DONE) -> None:
        self.keep_done = keep_done
        self._held: dict[str, Replica] = {}
        self._fences: dict[str, int] = {}

    def fence(self, task_id: str) -> int:
        """The newest fence known for ``task_id`` (-1: none)."""
        return self._fences.get(task_id, -1)

    def learn(self, task_id: str, fence: int) -> bool:
        """Note that ``fence`` is in force for ``task_id``; False if a newer one is known."""
        if fence < self.fence(task_id):
            return False
        self._fences[task_id] = fence
        return True

    def offer(self, replica: Replica) -> str | None:
        """Keep ``replica`` if it is the newest; None when kept (or already held), else why
        not (``STALE_FENCE``: its fence is older than one known for the task)."""
        if not self.learn(replica.task_id, replica.fence):
            return STALE_FENCE
        held = self._held.get(replica.task_id)
        if held is None or replica.order > held.order:
            self._held.pop(replica.task_id, None)  # re-inserted: newest last
            self._held[replica.task_id] = replica
            self._trim()
        return None

    def _trim(self) -> None:
        done = [t for t, r in self._held.items() if r.done]
        for task_id in done[: max(0, len(done) - self.keep_done)]:
            del self._held[task_id]

    def get(self, task_id: str) -> Replica | None:
        """The newest version held for ``task_id``."""
        return self._held.get(task_id)

    def drop(self, task_id: str) -> None:
        """Forget ``task_id``'s replica (the task ended); its fence is still remembered."""
        self._held.pop(task_id, None)

    @property
    def held_bytes(self) -> int:
        """Bytes of journal held for peers."""
        return sum(len(r.data) for r in self._held.values())
