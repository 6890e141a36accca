"""Persist tier: shards on disk as safetensors files, written atomically in the background.

File format (standard safetensors, readable by ``safetensors.safe_open``): an 8-byte
little-endian header length, a JSON header (per tensor: dtype, shape, data_offsets; plus
``__metadata__``), then the data region exactly as it lies in the arena, so writing is one
pass over the slot with no extra copy. The manifest (checksums, metrics, extra state) is
stored inside the file, in ``__metadata__["supervise.manifest"]`` (base64 msgpack): one file
is one atomic unit. Writes go to a temp file, are fsynced, renamed into place and the
directory fsynced. A file that fails verification (when listing: its header, size or name;
when loading: its checksums) is renamed aside to ``<name>.corrupt`` with one warning line, so no
later listing offers it again and a restart falls back to an older version.

Run identity: a tier created with a ``job`` keeps its files in ``<path>/<job>/`` and names the
job in each (``__metadata__["supervise.job"]``), so two jobs sharing a directory never touch
each other's files. It lists only its job's files: another job's are skipped with one line
naming them; files directly in ``<path>`` (the layout before job identities, no identity in
them) are accepted as this job's with one warning line. ``mark_finished`` leaves
``<path>/<job>/finished.rank-<5 digits>.json`` after a clean finish; `check_resumable` refuses
to resume a finished job unless asked.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

from supervise.runtime.private import open_private, private_dirs, write_private
from supervise.snapshot._dtypes import DTYPES
from supervise.snapshot.budget import check_free_space
from supervise.snapshot.checksum import mismatches
from supervise.snapshot.errors import (
    CapacityError,
    CorruptSnapshot,
    FinishedJob,
    SnapshotError,
    UnsupportedFormat,
)
from supervise.snapshot.manifest import Manifest
from supervise.snapshot.retention import VersionInfo
from supervise.telemetry import snapshot_span

if TYPE_CHECKING:
    from supervise.snapshot.service import ArenaService, CommitEvent, Shard

log = logging.getLogger(__name__)

_MAX_HEADER: Final = 100_000_000
_CHUNK: Final = 64 << 20
_NAME: Final = re.compile(r"^step-(\d{12})\.rank-(\d{5})\.safetensors$")
META_KEY: Final = "supervise.manifest"
JOB_KEY: Final = "supervise.job"
#: What a file that failed verification is renamed to (its name + this suffix).
CORRUPT_SUFFIX: Final = ".corrupt"
#: The environment variable naming a job (the standalone Snapshotter; the agent sets it for
#: its workers).
JOB_ENV: Final = "SUPERVISE_JOB"
#: ``1`` lets a standalone Snapshotter resume a job that finished (``--resume-finished``).
RESUME_FINISHED_ENV: Final = "SUPERVISE_RESUME_FINISHED"
_JOB: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_job(job: str) -> str:
    """``job`` if it is a valid job name, else a one-line ValueError."""
    if not isinstance(job, str) or not _JOB.match(job):
        raise ValueError(
            f"job {job!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    return job


def job_fingerprint(argv: Sequence[str], world_size: int) -> str:
    """The default job name: a fingerprint of the command line and the world size, so the
    same command restarted resumes its own checkpoints and another one does not."""
    text = "\0".join([*argv, f"world_size={world_size}"])
    return "cmd-" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@attrs.frozen(slots=True)
class DiskEntry:
    """A persisted shard found on disk (header checked; data verified only on load).
    ``job``: the job that wrote it (None: a file without identity)."""

    path: Path
    manifest: Manifest
    data_offset: int
    job: str | None = None

    @property
    def info(self) -> VersionInfo:
        """The version record of this file."""
        m = self.manifest
        return VersionInfo(m.step, m.generation, m.wall_time, m.nbytes, dict(m.metrics), "disk")


def safetensors_header(manifest: Manifest, job: str | None = None) -> bytes:
    """The header (length prefix + JSON, padded to 8 bytes) for a manifest's data region,
    naming ``job`` when given."""
    meta = {
        "format": "supervise.snapshot/1",  # the file layout; the manifest has its own format
        "step": str(manifest.step),
        "rank": str(manifest.rank),
        META_KEY: base64.b64encode(manifest.to_bytes()).decode("ascii"),
    }
    if job is not None:
        meta[JOB_KEY] = job
    header: dict[str, object] = {"__metadata__": meta}
    for t in sorted(manifest.tensors, key=lambda t: t.offset):
        header[t.name] = {
            "dtype": DTYPES[t.dtype][1],
            "shape": list(t.shape),
            "data_offsets": [t.offset, t.offset + t.nbytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _check_contiguous(manifest: Manifest) -> None:
    end = 0
    for t in sorted(manifest.tensors, key=lambda t: t.offset):
        if t.offset != end:
            raise ValueError(f"tensor {t.name!r} leaves a gap: safetensors needs a packed region")
        end += t.nbytes
    if end != manifest.nbytes:
        raise ValueError("the data region is larger than its tensors: safetensors needs it packed")


class PersistTier:
    """One rank's shards in a directory: ``step-<12 digits>.rank-<5 digits>.safetensors``.

    ``job`` names the run writing them: its files live in ``<path>/<job>/`` (see the module
    docstring). None: no identity, the files live in ``path`` itself (tools, direct users).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, rank: int, keep: int, job: str | None = None
    ) -> None:
        if keep < 1:
            raise ValueError(f"persist.keep = {keep}: must be >= 1")
        self.root = Path(path)
        self.job = None if job is None else check_job(job)
        self.path = self.root if self.job is None else self.root / self.job
        self.rank = rank
        self.keep = keep
        self._tmp_glob = f".step-*.rank-{rank:05d}.safetensors.tmp*"
        self._told: set[Path] = set()  # files already named in a skipped/accepted line
        self._looked_around = False  # other jobs' directories listed once
        self._bad: set[Path] = set()  # failed verification but could not be renamed aside
        self._unsupported: set[Path] = set()  # another supervise version's format: named once

    def filename(self, step: int) -> Path:
        """Where version ``step`` of this rank lives."""
        return self.path / f"step-{step:012d}.rank-{self.rank:05d}.safetensors"

    def write(self, manifest: Manifest, data: memoryview) -> Path:
        """Write one shard atomically (temp file, fsync, rename, fsync dir); returns its path.

        A full disk is a CapacityError and leaves no partial file behind.
        """
        if manifest.rank != self.rank:
            raise ValueError(f"manifest of rank {manifest.rank} given to rank {self.rank}'s tier")
        _check_contiguous(manifest)
        private_dirs(self.path)
        header = safetensors_header(manifest, self.job)
        final = self.filename(manifest.step)
        check_free_space(self.path, len(header) + manifest.nbytes, f"checkpoint {final.name}")
        tmp = self.path / f".{final.name}.tmp{os.getpid()}"
        fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            try:
                _write_all(fd, memoryview(header))
                region = data[: manifest.nbytes]
                for start in range(0, manifest.nbytes, _CHUNK):
                    _write_all(fd, region[start : start + _CHUNK])
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(final)
            self._bad.discard(final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise CapacityError(f"disk full while writing checkpoint {final}") from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path)
        return final

    def _files(self, directory: Path) -> list[tuple[int, Path]]:
        """(step, path) of this rank's files in ``directory``, by step."""
        if not directory.is_dir():
            return []
        return [
            (int(m.group(1)), p)
            for p in sorted(directory.iterdir())
            if (m := _NAME.match(p.name)) and int(m.group(2)) == self.rank
        ]

    def _legacy(self) -> list[tuple[int, Path]]:
        """This rank's files directly in ``root`` (the layout before job identities)."""
        return [] if self.job is None else self._files(self.root)

    def entries(self, *, quiet: bool = False) -> list[DiskEntry]:
        """This job's readable files of this rank, oldest step first.

        A file that fails its header checks is quarantined (renamed aside); another job's
        files are skipped and files without identity accepted, each named once in one line
        (``quiet``: not named, e.g. by a start-up check before the agent that will name them).
        """
        found: dict[int, DiskEntry] = {}
        foreign: list[DiskEntry | Path] = []
        unknown: list[DiskEntry] = []
        for step, p in [*self._legacy(), *self._files(self.path)]:  # own files win a tie
            if p in self._bad:
                continue
            try:
                entry = read_entry(p)
            except UnsupportedFormat as exc:
                if p not in self._unsupported:
                    log.warning("skipping checkpoint %s, left in place: %s", p, exc)
                self._unsupported.add(p)
                continue
            except CorruptSnapshot as exc:
                self.quarantine(p, str(exc))
                continue
            except OSError as exc:
                log.warning("skipping unreadable checkpoint %s: %s", p, exc)
                continue
            if entry.manifest.step != step or entry.manifest.rank != self.rank:
                self.quarantine(p, "its manifest names another step or rank than its file name")
                continue
            if self.job is not None and entry.job != self.job:
                if entry.job is not None:
                    foreign.append(entry)
                    continue
                unknown.append(entry)
            found[step] = entry
        if quiet:
            return [found[s] for s in sorted(found)]
        if self.job is not None and not self._looked_around and self.root.is_dir():
            # Other jobs' directories, for the one line that names them: once per tier, as
            # nothing here reads them (``path`` may be a busy directory).
            self._looked_around = True
            for d in sorted(self.root.iterdir()):
                if d != self.path and _JOB.match(d.name) and d.is_dir():
                    foreign += [p for _, p in self._files(d)]
        self._tell(foreign, unknown)
        return [found[s] for s in sorted(found)]

    def _tell(self, foreign: list[DiskEntry | Path], unknown: list[DiskEntry]) -> None:
        """One line for another job's files skipped, one for files without identity accepted
        (each file named once per tier)."""
        paths = [f.path if isinstance(f, DiskEntry) else f for f in foreign]
        new_foreign = [p for p in paths if p not in self._told]
        if new_foreign:
            log.warning(
                "not restoring %d checkpoint file(s) of another job in %s (this job is %r): %s",
                len(new_foreign),
                self.root,
                self.job,
                ", ".join(str(p.relative_to(self.root)) for p in new_foreign),
            )
        new_unknown = [e for e in unknown if e.path not in self._told]
        if new_unknown:
            log.warning(
                "accepting %d checkpoint file(s) without a job identity in %s as job %r's "
                "(written before job identities): %s",
                len(new_unknown),
                self.root,
                self.job,
                ", ".join(e.path.name for e in new_unknown),
            )
        self._told.update([*new_foreign, *(e.path for e in new_unknown)])

    def load(self, entry: DiskEntry, into: memoryview, *, threads: int = 1) -> None:
        """Read a shard's data region into ``into`` and verify every checksum; a file that
        fails (truncated, checksum mismatch) is quarantined and CorruptSnapshot raised."""
        n = entry.manifest.nbytes
        if len(into) < n:
            raise CapacityError(f"{entry.path} needs {n} bytes, the buffer has {len(into)}")
        try:
            with open(entry.path, "rb", buffering=0) as f:
                f.seek(entry.data_offset)
                view = into[:n]
                got = 0
                while got < n:
                    r = f.readinto(view[got : got + _CHUNK])
                    if not r:
                        raise CorruptSnapshot(f"{entry.path} is truncated")
                    got += r
            bad = mismatches(entry.manifest, into, threads=threads)
            if bad:
                raise CorruptSnapshot(
                    f"{entry.path}: checksum mismatch in {len(bad)} tensor(s), first {bad[0]!r}"
                )
        except CorruptSnapshot as exc:
            self.quarantine(entry.path, str(exc))
            raise

    def quarantine(self, path: Path, reason: str) -> Path | None:
        """Rename a file that failed verification to ``<name>.corrupt`` (kept for a look, never
        listed again); where it cannot be renamed, this tier remembers it as bad and never
        lists it again either. Returns the new path (None if not renamed)."""
        aside = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            path.replace(aside)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if path not in self._bad:
                log.warning(
                    "checkpoint %s fails verification (%s) and cannot be renamed (%s): "
                    "it is not offered again by this process",
                    path,
                    reason,
                    exc,
                )
            self._bad.add(path)
            return None
        with contextlib.suppress(OSError):
            _fsync_dir(path.parent)
        log.warning(
            "checkpoint %s fails verification (%s): renamed to %s, it is not offered again",
            path,
            reason,
            aside.name,
        )
        return aside

    def prune(self, head: int) -> list[Path]:
        """Keep the ``keep`` newest files at or below ``head``; files above ``head`` belong to
        a rolled-back future and go too. Only this job's files count (with those it accepted
        from before job identities). Returns the removed paths."""
        names = [(s, p) for s, p in self._legacy() if not self._foreign(p)]
        names += self._files(self.path)
        below = sorted({s for s, _ in names if s <= head}, reverse=True)
        keep = set(below[: self.keep])
        return _remove(p for step, p in names if step not in keep)

    def make_room(self, step: int) -> list[Path]:
        """Before writing ``step`` to a full disk: remove now what its write's ``prune`` would
        remove right after (files above ``step``, all but the ``keep - 1`` newest below it),
        never the newest one below it, so one version stays on disk while ``step`` is
        written; and temp files of writes that crashed. Returns the removed paths."""
        self.clean_temporaries()
        names = self._files(self.path)
        below = sorted((s for s, _ in names if s < step), reverse=True)
        keep = {step, *below[: max(self.keep - 1, 1)]}
        return _remove(p for s, p in names if s not in keep)

    def newest_step(self) -> int | None:
        """The newest step of this rank on disk (by file name), None if none."""
        return max((step for step, _ in self._files(self.path)), default=None)

    def _foreign(self, path: Path) -> bool:
        """Whether ``path`` names another job in its header (an unreadable file does not)."""
        try:
            job = read_entry(path).job
        except (CorruptSnapshot, OSError):
            return False
        return job is not None and job != self.job

    def clean_temporaries(self) -> None:
        """Remove temp files a crashed write of this rank left behind."""
        for d in {self.root, self.path}:
            for p in d.glob(self._tmp_glob) if d.is_dir() else ():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # -- the finished marker ---------------------------------------------------------------

    @property
    def marker(self) -> Path | None:
        """Where this job's "finished" marker of this rank lives (None: a tier without job)."""
        if self.job is None:
            return None
        return self.path / f"finished.rank-{self.rank:05d}.json"

    def finished(self) -> bool:
        """Whether this job's training finished here (its marker exists)."""
        return self.marker is not None and self.marker.exists()

    def mark_finished(self) -> Path | None:
        """Record that this job's training of this rank completed (where the directory exists:
        a run that never persisted leaves nothing). Returns the marker's path."""
        marker = self.marker
        if marker is None or not self.path.is_dir():
            return None
        tmp = marker.with_name(f".{marker.name}.tmp{os.getpid()}")
        write_private(tmp, json.dumps({"job": self.job, "rank": self.rank, "time": time.time()}))
        tmp.replace(marker)
        _fsync_dir(self.path)
        return marker

    def clear_finished(self) -> None:
        """Forget this job's "finished" marker (it runs again)."""
        if self.marker is not None:
            self.marker.unlink(missing_ok=True)


def check_resumable(tiers: Iterable[PersistTier], *, resume_finished: bool, hint: str) -> None:
    """Refuse to resume a job that finished (`FinishedJob`, one line ending with ``hint``)
    unless ``resume_finished``; then its markers are removed, as it runs again. A marker
    with no checkpoint file of the job left means nothing to resume: it is removed."""
    for tier in tiers:
        if not tier.finished():
            continue
        if resume_finished or not tier.entries():
            tier.clear_finished()
            continue
        marker = tier.marker
        assert marker is not None
        raise FinishedJob(
            f"job {tier.job!r} already finished in {tier.path} (marker {marker.name}): its "
            f"checkpoints are not resumed unless asked; {hint}"
        )


def read_entry(path: Path) -> DiskEntry:
    """Parse and check a file's header against its size and embedded manifest."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptSnapshot("file shorter than its length prefix")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > _MAX_HEADER:
            raise CorruptSnapshot(f"header length {hlen} is implausible")
        raw = f.read(hlen)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < hlen:
        raise CorruptSnapshot("file ends inside its header")
    try:
        header = json.loads(raw)
        meta = header["__metadata__"]
        manifest = Manifest.from_bytes(base64.b64decode(meta[META_KEY], validate=True))
    except CorruptSnapshot:
        raise
    except Exception as exc:
        raise CorruptSnapshot(f"header is not a supervise safetensors header: {exc}") from None
    job = meta.get(JOB_KEY)
    if job is not None and not isinstance(job, str):
        raise CorruptSnapshot(f"header names job {job!r}, not a string")
    data_offset = 8 + hlen
    if size != data_offset + manifest.nbytes:
        raise CorruptSnapshot(
            f"file has {size} bytes, its header announces {data_offset + manifest.nbytes}"
        )
    for t in manifest.tensors:
        h = header.get(t.name)
        if (
            not isinstance(h, dict)
            or h.get("data_offsets") != [t.offset, t.offset + t.nbytes]
            or h.get("shape") != list(t.shape)
            or h.get("dtype") != DTYPES[t.dtype][1]
        ):
            raise CorruptSnapshot(f"tensor {t.name!r} disagrees between header and manifest")
    return DiskEntry(path, manifest, data_offset, job)


def _write_all(fd: int, buf: memoryview) -> None:
    while len(buf):
        n = os.write(fd, buf)
        buf = buf[n:]


def _remove(paths: Iterable[Path]) -> list[Path]:
    """Delete ``paths`` (one already gone is no error), then sync their directories; returns
    the paths removed."""
    removed = []
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    for d in {p.parent for p in removed}:
        _fsync_dir(d)
    return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Persister:
    """Writes every ``every``-th version captured on this node (source "local"; shards that
    came from a peer or from disk are not written again) of each rank to its PersistTier in a
    background thread (the slot stays pinned, so nothing is copied); a failed write is
    logged and never disturbs training. Hook it up with
    ``service.add_commit_hook(persister.on_commit)``."""

    def __init__(
        self,
        service: ArenaService,
        tiers: Callable[[int], PersistTier],
        *,
        every: int,
        node_rank: int | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"persist.every_snapshots = {every}: must be >= 1 to persist")
        self.service = service
        self.every = every
        self.node_rank = node_rank  # the node agent's rank for the spans (None: the shard's rank)
        self._tiers = tiers
        self._counts: dict[int, int] = {}
        self._queue: queue.Queue[tuple[PersistTier, contextlib.ExitStack, Shard] | None] = (
            queue.Queue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written: list[Path] = []
        self.behind: dict[int, int] = {}  # rank -> first step that could not be persisted

    def on_commit(self, event: CommitEvent) -> None:
        """Commit hook: pin the shard now and queue it for writing when it is due."""
        if event.info.source != "local":
            return
        n = self._counts.get(event.rank, 0) + 1
        self._counts[event.rank] = n
        if n % self.every:
            return
        try:
            tier = self._tiers(event.rank)
        except KeyError:  # not a training rank of this node (a farm task's journal): RAM only
            return
        stack = contextlib.ExitStack()
        try:
            shard = stack.enter_context(self.service.shard(event.rank, event.info.step))
        except SnapshotError:
            stack.close()
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="supervise-persist", daemon=True
                )
                self._thread.start()
        self._queue.put((tier, stack, shard))

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            tier, stack, shard = job
            m = shard.manifest
            try:
                with (
                    stack,
                    snapshot_span(
                        "persist",
                        node_rank=m.rank if self.node_rank is None else self.node_rank,
                        rank=m.rank,
                        snapshot_step=m.step,
                        snapshot_version=m.step,
                        bytes=m.nbytes,
                    ),
                ):
                    path = self._write(tier, shard)
                tier.prune(shard.manifest.step)
                self.written.append(path)
                self._caught_up(tier, m.step)
            except Exception as exc:
                self._fell_behind(tier, m.step, exc)
            finally:
                self._queue.task_done()

    @staticmethod
    def _write(tier: PersistTier, shard: Shard) -> Path:
        """Write a shard; on a full disk, free what retention allows and try once more."""
        try:
            return tier.write(shard.manifest, shard.data)
        except CapacityError:
            if not tier.make_room(shard.manifest.step):
                raise
            log.info("persist tier %s was full: removed older versions to make room", tier.path)
            return tier.write(shard.manifest, shard.data)

    def _fell_behind(self, tier: PersistTier, step: int, exc: Exception) -> None:
        """Say once (not per snapshot) that the persist tier stopped keeping up, since when."""
        if tier.rank in self.behind:
            log.debug("still could not persist rank %d version %d: %s", tier.rank, step, exc)
            return
        self.behind[tier.rank] = step
        newest = tier.newest_step()
        on_disk = "nothing" if newest is None else f"version {newest}"
        log.error(
            "persist tier is behind for rank %d since step %d (%s): a restart from disk would "
            "go back to %s; said once, until a write succeeds again",
            tier.rank,
            step,
            exc,
            on_disk,
        )

    def _caught_up(self, tier: PersistTier, step: int) -> None:
        since = self.behind.pop(tier.rank, None)
        if since is not None:
            log.warning(
                "persist tier caught up for rank %d at step %d (behind since step %d)",
                tier.rank,
                step,
                since,
            )

    def flush(self) -> None:
        """Wait until every queued write finished."""
        self._queue.join()

    def close(self) -> None:
        """Finish queued writes and stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()
