"""A task's journal: the committed results of its steps, its state, its progress, its outcome.

`Journal` is the small interface a `TaskContext` writes through. Two backends today:
`MemoryJournal` (one process), `DiskJournal` (a directory; each commit is one file written
to a temporary name, fsynced, renamed into place and checksummed, so a crash mid-write leaves
the previous commits whole and a torn or corrupted file is never used) and `ArenaJournal`
(`arena_journal`: versions in the snapshot machinery's arena, held by the node agent).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import attrs
import msgpack

from supervise.runtime.private import open_private, private_dirs
from supervise.snapshot.hashing import digest

_MAGIC: Final = b"SVTASK01"
_HEADER: Final = struct.Struct("<8sQQ")  # magic, XXH3-64 of the payload, payload length
_COMMIT_GLOB: Final = "commit-*.rec"
_OUTCOME: Final = "outcome.rec"


class CorruptRecord(ValueError):
    """A journal file that is torn, truncated or fails its checksum (never used)."""


@attrs.frozen(slots=True)
class StepRecord:
    """A committed step: its name, idempotency key, encoded result, and the attempt that ran it."""

    name: str
    key: str
    value: bytes
    attempt: int


@attrs.frozen(slots=True)
class Commit:
    """What one checkpoint makes durable at once: new steps, the state, the progress."""

    attempt: int
    steps: tuple[StepRecord, ...] = ()
    state: bytes | None = None
    progress: float = 0.0


@attrs.frozen(slots=True)
class Outcome:
    """How an attempt ended: ``value`` (encoded result) when it returned, else the error."""

    attempt: int
    value: bytes | None = None
    error_type: str = ""
    error_mro: tuple[str, ...] = ()
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the attempt returned."""
        return self.value is not None


@attrs.frozen(slots=True)
class JournalView:
    """Everything committed so far, folded: the newest state and progress, every step."""

    steps: Mapping[str, StepRecord] = attrs.field(factory=dict)
    state: bytes | None = None
    progress: float = 0.0
    commits: int = 0
    dropped: int = 0  # commit files that were corrupt and ignored


class Journal(Protocol):
    """Where a task's commits go; ``commit`` is durable (per backend) when it returns."""

    def read(self) -> JournalView: ...
    def commit(self, commit: Commit) -> None: ...
    def finish(self, outcome: Outcome) -> None: ...
    def outcome(self) -> Outcome | None: ...


def fold(commits: list[Commit], dropped: int = 0) -> JournalView:
    """The view of a list of commits, oldest first."""
    steps: dict[str, StepRecord] = {}
    state: bytes | None = None
    progress = 0.0
    for c in commits:
        for s in c.steps:
            steps.setdefault(s.name, s)  # the first commit of a step wins
        if c.state is not None:
            state = c.state
        progress = max(progress, c.progress)
    return JournalView(steps, state, progress, len(commits), dropped)


class MemoryJournal:
    """A journal in this process's memory (tests, and tasks run in-process)."""

    def __init__(self) -> None:
        self._commits: list[Commit] = []
        self._outcome: Outcome | None = None

    def read(self) -> JournalView:
        return fold(list(self._commits))

    def commit(self, commit: Commit) -> None:
        self._commits.append(commit)

    def finish(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def outcome(self) -> Outcome | None:
        return self._outcome


# ---------------------------------------------------------------------------- on disk


def seal(payload: bytes) -> bytes:
    """A record: header (magic, checksum, length) + payload."""
    return _HEADER.pack(_MAGIC, digest(payload), len(payload)) + payload


def unseal(data: bytes, name: str) -> bytes:
    """The payload of a record; `CorruptRecord` (one line naming ``name``) if anything is off."""
    if len(data) < _HEADER.size:
        raise CorruptRecord(f"{name}: {len(data)} bytes is shorter than a record header")
    magic, expected, length = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CorruptRecord(f"{name}: not a task journal record (magic {magic!r})")
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise CorruptRecord(f"{name}: {len(payload)} payload bytes, header says {length}")
    if digest(payload) != expected:
        raise CorruptRecord(f"{name}: checksum mismatch")
    return payload


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing: temporary file,
    fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)  # 0600
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def commit_to_wire(c: Commit) -> dict[str, Any]:
    """A commit as plain msgpack data."""
    return {
        "attempt": c.attempt,
        "steps": [[s.name, s.key, s.value, s.attempt] for s in c.steps],
        "state": c.state,
        "progress": c.progress,
    }


def commit_from_wire(d: Any, name: str) -> Commit:
    """The commit `commit_to_wire` wrote; CorruptRecord naming ``name`` otherwise."""
    try:
        steps = tuple(StepRecord(str(n), str(k), bytes(v), int(a)) for n, k, v, a in d["steps"])
        state = d["state"]
        return Commit(
            int(d["attempt"]),
            steps,
            None if state is None else bytes(state),
            float(d["progress"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecord(f"{name}: malformed commit ({type(e).__name__}: {e})") from None


def _seq(file: Path) -> int:
    """A commit file's number (0 for a stray file that only looks like one)."""
    number = file.stem.partition("-")[2]
    return int(number) if number.isdigit() else 0


class DiskJournal:
    """A journal in a directory of checksummed, atomically written commit files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = private_dirs(path)  # 0700 whatever the umask: no one else reads or adds

    def _load(self, file: Path) -> Any:
        payload = unseal(file.read_bytes(), str(file))
        try:
            return msgpack.unpackb(payload, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError) as e:
            raise CorruptRecord(f"{file}: undecodable ({e})") from None

    def _files(self) -> list[Path]:
        return sorted(self.path.glob(_COMMIT_GLOB))

    def read(self) -> JournalView:
        commits: list[Commit] = []
        dropped = 0
        for f in self._files():
            try:
                commits.append(commit_from_wire(self._load(f), str(f)))
            except (OSError, CorruptRecord):
                dropped += 1
        return fold(commits, dropped)

    def commit(self, commit: Commit) -> None:
        seq = max((_seq(f) for f in self._files()), default=0) + 1
        payload: bytes = msgpack.packb(commit_to_wire(commit), use_bin_type=True)
        write_atomic(self.path / f"commit-{seq:08d}.rec", seal(payload))

    def finish(self, outcome: Outcome) -> None:
        payload: bytes = msgpack.packb(outcome_to_wire(outcome), use_bin_type=True)
        write_atomic(self.path / _OUTCOME, seal(payload))

    def outcome(self) -> Outcome | None:
        file = self.path / _OUTCOME
        if not file.exists():
            return None
        with contextlib.suppress(OSError, CorruptRecord):
            return outcome_from_wire(self._load(file), str(file))
        return None


def outcome_to_wire(o: Outcome) -> dict[str, Any]:
    """An outcome as plain msgpack data."""
    return {
        "attempt": o.attempt,
        "value": o.value,
        "error_type": o.error_type,
        "error_mro": list(o.error_mro),
        "message": o.message,
    }


def outcome_from_wire(d: Any, name: str) -> Outcome:
    """The outcome `outcome_to_wire` wrote; CorruptRecord naming ``name`` otherwise."""
    try:
        return Outcome(
            int(d["attempt"]),
            None if d["value"] is None else bytes(d["value"]),
            str(d["error_type"]),
            tuple(str(x) for x in d["error_mro"]),
            str(d["message"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptRecord(f"{name}: malformed outcome ({type(e).__name__}: {e})") from None
