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

from supervise.snapshot.checksum import mismatches, xxh64
from supervise.snapshot.errors import CapacityError
from supervise.snapshot.manifest import Manifest, TensorEntry
from supervise.snapshot.protocol import Hello
from supervise.tasks.journal import (
    Commit,
    CorruptRecord,
    JournalView,
    Outcome,
    commit_from_wire,
    commit_to_wire,
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
        self._load()

    def _load(self) -> None:
        for cand in self.owner.restore("latest"):
            data = cand.slot.arena.data(cand.slot.slot, cand.manifest.nbytes)
            if mismatches(cand.manifest, data):
                self.owner.corrupt(cand.info.step, "task journal checksum mismatch")
                self._dropped += 1
                continue
            try:
                d = msgpack.unpackb(bytes(data), raw=False)
                commits = [commit_from_wire(c, "arena journal") for c in d["commits"]]
                outcome = d["outcome"]
                self._outcome = None if outcome is None else outcome_from_wire(outcome, "arena")
            except (KeyError, TypeError, ValueError, CorruptRecord):
                self.owner.corrupt(cand.info.step, "task journal undecodable")
                self._dropped += 1
                continue
            self._commits = commits
            self._version = cand.info.step
            self.owner.restored(cand.info.step)
            return

    def read(self) -> JournalView:
        view = fold(list(self._commits), self._dropped)
        return view

    def _write(self, commits: list[Commit], outcome: Outcome | None) -> None:
        blob: bytes = msgpack.packb(
            {
                "commits": [commit_to_wire(c) for c in commits],
                "outcome": None if outcome is None else outcome_to_wire(outcome),
            },
            use_bin_type=True,
        )
        n = len(blob)
        self.owner.attach(_room(n), _MANIFEST_ROOM)
        slot = self.owner.begin()
        if slot is None:
            raise CapacityError("no free arena slot for the task journal (all retained or busy)")
        try:
            slot.arena.data(slot.slot, n)[:] = blob
            version = self._version + 1
            manifest = Manifest(
                step=version,
                generation=self.generation,
                rank=self.owner.rank,
                world_size=self.owner.rank + 1,  # one shard per task: its rank is its id
                nbytes=n,
                tensors=(TensorEntry(_TENSOR, "uint8", (n,), 0, n, xxh64(blob)),),
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
        self._commits = folded

    def finish(self, outcome: Outcome) -> None:
        self._write(self._commits, outcome)
        self._outcome = outcome

    def outcome(self) -> Outcome | None:
        return self._outcome


def _room(n: int) -> int:
    """Slot capacity for ``n`` bytes with room to grow (a journal grows with every commit)."""
    return max(_MIN_ROOM, 1 << (n - 1).bit_length())


def _compact(commits: list[Commit]) -> list[Commit]:
    """One commit holding what ``commits`` add up to: every step, the newest state, the
    highest progress (a version holds the whole journal, so older states are dead weight)."""
    view = fold(commits)
    attempt = commits[-1].attempt if commits else 0
    return [Commit(attempt, tuple(view.steps.values()), view.state, view.progress)]
