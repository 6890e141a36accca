"""`ArenaJournal`: a task's journal as versions in the snapshot machinery's arena.

Each commit writes the whole journal, compacted (every step result, the newest state and
progress, the outcome), as one version of the task's shard: a single ``uint8`` tensor
checksummed with xxhash64, through an `Owner` — the process serving the local endpoint
(`AgentClient`: a `JournalHost`, or the node agent, which replicates committed versions to
its group peers) or an in-process `ArenaService` (`LocalOwner`). The arena's double buffering
means a crash mid-write leaves the previous version committed; a version whose bytes fail
their checksum is never used.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import msgpack

from supervise.snapshot.checksum import mismatches
from supervise.snapshot.errors import CapacityError
from supervise.snapshot.hashing import digest
from supervise.snapshot.manifest import Manifest, TensorEntry
from supervise.snapshot.protocol import Hello
from supervise.tasks.journal import (
    Commit,
    CorruptRecord,
    JournalView,
    Outcome,
    StepRecord,
    fold,
    outcome_from_wire,
    outcome_to_wire,
)

if TYPE_CHECKING:
    from supervise.snapshot.client import Owner

_TENSOR = "journal"
_MANIFEST_ROOM = 1 << 16
_MIN_ROOM = 1 << 16


class ArenaJournal:
    """A journal held in an arena owner's RAM (one shard per task: the owner's ``rank``)."""

    def __init__(self, owner: Owner, *, generation: int = 0) -> None:
        self.owner = owner
        self.generation = generation
        owner.hello(Hello(owner.rank, 0, owner.rank + 1, generation, os.getpid()))
        self._commits: list[Commit] = []
        self._outcome: Outcome | None = None
        self._version = 0
        self._dropped = 0
        self._capacity = 0  # of the slots begin() hands out (attach again to grow)
        self._load()

    def _load(self) -> None:
        for cand in self.owner.restore("latest"):
            data = cand.slot.arena.data(cand.slot.slot, cand.manifest.nbytes)
            if mismatches(cand.manifest, data):
                self.owner.corrupt(cand.info.step, "task journal checksum mismatch")
                self._dropped += 1
                continue
            try:
                commit, outcome = _unpack(data)
            except (KeyError, TypeError, ValueError, IndexError, CorruptRecord):
                self.owner.corrupt(cand.info.step, "task journal undecodable")
                self._dropped += 1
                continue
            self._commits = [commit]
            self._outcome = outcome
            self._version = cand.info.step
            self.owner.restored(cand.info.step)
            return

    def read(self) -> JournalView:
        return fold(list(self._commits), self._dropped)

    def _write(self, commit: Commit, outcome: Outcome | None) -> None:
        header, payloads = _layout(commit, outcome)
        n = 4 + len(header) + sum(len(p) for p in payloads)
        if n > self._capacity:
            self._capacity = self.owner.attach(_room(n), _MANIFEST_ROOM).data_capacity
        slot = self.owner.begin()
        if slot is None:
            raise CapacityError("no free arena slot for the task journal (all retained or busy)")
        try:
            dst = slot.arena.data(slot.slot, n)
            dst[:4] = len(header).to_bytes(4, "little")
            at = 4
            for part in (header, *payloads):  # each value copied once, straight into the slot
                dst[at : at + len(part)] = part
                at += len(part)
            version = self._version + 1
            manifest = Manifest(
                step=version,
                generation=self.generation,
                rank=self.owner.rank,
                world_size=self.owner.rank + 1,  # one shard per task: its rank is its id
                nbytes=n,
                tensors=(TensorEntry(_TENSOR, "uint8", (n,), 0, n, digest(dst)),),
                wall_time=time.time(),
            )
            self.owner.commit(slot, manifest.to_bytes())
        except BaseException:
            self.owner.abort(slot)
            raise
        self._version = version

    def commit(self, commit: Commit) -> None:
        folded = _compact([*self._commits, commit])
        self._write(folded, self._outcome)
        self._commits = [folded]

    def finish(self, outcome: Outcome) -> None:
        self._write(_compact(self._commits), outcome)
        self._outcome = outcome

    def outcome(self) -> Outcome | None:
        return self._outcome


def _room(n: int) -> int:
    """Slot capacity for ``n`` bytes with room to grow (a journal grows with every commit)."""
    return max(_MIN_ROOM, 1 << (n - 1).bit_length())


def _compact(commits: list[Commit]) -> Commit:
    """One commit holding what ``commits`` add up to: every step, the newest state, the
    highest progress (a version holds the whole journal, so older states are dead weight)."""
    view = fold(commits)
    attempt = commits[-1].attempt if commits else 0
    return Commit(attempt, tuple(view.steps.values()), view.state, view.progress)


def _layout(commit: Commit, outcome: Outcome | None) -> tuple[bytes, list[bytes]]:
    """A version's bytes: ``u32 header length``, the msgpack header (names, keys, sizes), then
    the values back to back (step results, state, outcome value), never re-encoded."""
    payloads = [s.value for s in commit.steps]
    state = commit.state
    if state is not None:
        payloads.append(state)
    value = outcome.value if outcome is not None else None
    if value is not None:
        payloads.append(value)
    header: bytes = msgpack.packb(
        {
            "attempt": commit.attempt,
            "steps": [[s.name, s.key, len(s.value), s.attempt] for s in commit.steps],
            "state": None if state is None else len(state),
            "progress": commit.progress,
            "outcome": None if outcome is None else {**outcome_to_wire(outcome), "value": None},
            "value": None if value is None else len(value),
        },
        use_bin_type=True,
    )
    return header, payloads


def unpack(data: memoryview | bytes) -> tuple[Commit, Outcome | None]:
    """The commit and outcome of a version's bytes (`CorruptRecord`, KeyError... if not one)."""
    return _unpack(memoryview(data))


def _unpack(data: memoryview) -> tuple[Commit, Outcome | None]:
    """The commit and outcome `_layout` wrote."""
    n = int.from_bytes(data[:4], "little")
    h = msgpack.unpackb(bytes(data[4 : 4 + n]), raw=False)
    at = 4 + n

    def take(size: int) -> bytes:
        nonlocal at
        if at + size > len(data):
            raise CorruptRecord("task journal: a value runs past the end of the version")
        out = bytes(data[at : at + size])
        at += size
        return out

    steps = tuple(
        StepRecord(str(name), str(key), take(int(size)), int(a))
        for name, key, size, a in h["steps"]
    )
    state = None if h["state"] is None else take(int(h["state"]))
    outcome = None
    if h["outcome"] is not None:
        value = None if h["value"] is None else take(int(h["value"]))
        outcome = outcome_from_wire({**h["outcome"], "value": value}, "arena journal")
    return Commit(int(h["attempt"]), steps, state, float(h["progress"])), outcome
