"""Arena: one shared-memory file per local worker holding several snapshot slots.

Layout (all little-endian)::

    [header page]  magic, format, slot count, slot stride, data capacity, manifest capacity, rank
    [slot 0] [slot 1] ...   each: 32-byte slot header (state, seq, manifest length, manifest
                            checksum), the committed manifest, then the page-aligned data region

Formats: 2 (created now) checksums each slot's manifest with XXH3-64; 1 (created before) with
xxhash64. An owner re-adopting a format-1 arena keeps committing in format 1; any other
format is refused in one line.

The writer fills a slot the owner handed out (marked WRITING first); the owner commits it by
writing the manifest and then, last, the state word. A crash at any point leaves every other
committed slot intact, and a half-written slot is never COMMITTED. Because the committed
manifests live in the file, a restarted owner re-adopts the arena without losing a version.

Files are created with os.open + ftruncate + posix_fallocate + mmap (not
multiprocessing.shared_memory, whose resource tracker unlinks segments when a process
exits); fallocate reserves the pages up front, so a full /dev/shm is a clear CapacityError
here instead of a SIGBUS during a copy.
"""

from __future__ import annotations

import enum
import errno
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Final

import attrs

from supervise.snapshot.budget import check_free_space, fmt_bytes
from supervise.snapshot.errors import CapacityError, CorruptSnapshot, UnsupportedFormat
from supervise.snapshot.hashing import Checksum, digest

MAGIC: Final = b"SVARENA\x01"
PAGE: Final = 4096
# magic, format, n_slots, stride, data capacity, manifest capacity, rank, created
_HEADER: Final = struct.Struct("<8sIIQQQqd")
_SLOT: Final = struct.Struct("<QQQQ")  # state, seq, manifest length, manifest checksum
_SLOT_HEADER_SIZE: Final = 64
#: The arena format created; each format this version opens, with its manifests' checksum.
FORMAT: Final = 2
_SLOT_CHECKSUM: Final = {1: Checksum.XXH64, 2: Checksum.XXH3_64}


class SlotState(enum.IntEnum):
    """Lifecycle of a slot: FREE -> WRITING -> COMMITTED -> (evicted) FREE."""

    FREE = 0
    WRITING = 1
    COMMITTED = 2


def _map(fd: int, size: int) -> mmap.mmap:
    """Map shared, with the page tables filled at once (MAP_POPULATE where the OS has it):
    otherwise the first copy into each slot pays a page fault per 4 KiB (seconds per GiB)."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)


def _round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


@attrs.frozen(slots=True)
class Committed:
    """A committed slot found in an arena file: its slot, commit sequence and manifest bytes."""

    slot: int
    seq: int
    manifest: bytes


class Arena:
    """A memory-mapped arena file. The owner commits; the writer only fills data regions."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, *, unlinked: bool) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        self._unlinked = unlinked
        self._view = memoryview(mm)
        magic, fmt, n_slots, stride, data_cap, man_cap, rank, created = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC:
            self.close()
            raise CorruptSnapshot(f"{path} is not a supervise arena (bad magic)")
        if fmt not in _SLOT_CHECKSUM:
            self.close()
            reads = " and ".join(str(f) for f in _SLOT_CHECKSUM)
            raise UnsupportedFormat(
                f"{path}: arena format {fmt} is not one this version reads ({reads})"
            )
        self.format: int = fmt
        self._checksum = _SLOT_CHECKSUM[fmt]
        self.n_slots: int = n_slots
        self.stride: int = stride
        self.data_capacity: int = data_cap
        self.manifest_capacity: int = man_cap
        self.rank: int = rank
        self.created: float = created
        self._data_start = _round_up(_SLOT_HEADER_SIZE + man_cap)
        if len(mm) < PAGE + n_slots * stride or self._data_start + data_cap > stride:
            self.close()
            raise CorruptSnapshot(f"{path}: arena file is truncated or its header is inconsistent")

    # -- creation / opening -------------------------------------------------------------

    @staticmethod
    def size_for(*, data_capacity: int, n_slots: int, manifest_capacity: int) -> int:
        """Bytes an arena with these parameters occupies."""
        stride = _round_up(_SLOT_HEADER_SIZE + manifest_capacity) + _round_up(data_capacity)
        return PAGE + n_slots * stride

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        data_capacity: int,
        n_slots: int,
        manifest_capacity: int = 1 << 20,
        rank: int = 0,
        unlink: bool = False,
    ) -> Arena:
        """Create (exclusively) and reserve an arena file; ``unlink=True`` removes its name at
        once, so the memory goes away with the last mapping (in-process arenas)."""
        if n_slots < 1 or data_capacity < 0 or manifest_capacity < 1024:
            raise ValueError(
                f"arena needs n_slots >= 1, data_capacity >= 0, manifest_capacity >= 1024 "
                f"(got {n_slots}, {data_capacity}, {manifest_capacity})"
            )
        path = Path(path)
        manifest_capacity = _round_up(_SLOT_HEADER_SIZE + manifest_capacity) - _SLOT_HEADER_SIZE
        data_capacity = _round_up(data_capacity)
        size = cls.size_for(
            data_capacity=data_capacity, n_slots=n_slots, manifest_capacity=manifest_capacity
        )
        what = f"snapshot arena for rank {rank} ({n_slots} slots x {fmt_bytes(data_capacity)})"
        check_free_space(path.parent, size, what)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CapacityError(
                        f"{what} needs {fmt_bytes(size)} but {path.parent} ran out of space "
                        f"while reserving it"
                    ) from None
                raise
            mm = _map(fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        _HEADER.pack_into(
            mm,
            0,
            MAGIC,
            FORMAT,
            n_slots,
            _round_up(_SLOT_HEADER_SIZE + manifest_capacity) + data_capacity,
            data_capacity,
            manifest_capacity,
            rank,
            time.time(),
        )
        if unlink:
            path.unlink()
        return cls(path, fd, mm, unlinked=unlink)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Arena:
        """Map an existing arena file (a worker attaching, or an owner re-adopting)."""
        path = Path(path)
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < PAGE:
                raise CorruptSnapshot(f"{path} is too small to be a supervise arena")
            mm = _map(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, unlinked=False)

    # -- access ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Size of the mapping."""
        return len(self._mm)

    @property
    def buffer(self) -> memoryview:
        """The whole mapping (for pinning it as CUDA host memory)."""
        return self._view

    def _slot_base(self, slot: int) -> int:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} out of range (arena has {self.n_slots})")
        return PAGE + slot * self.stride

    def data_offset(self, slot: int) -> int:
        """Offset of a slot's data region within the mapping."""
        return self._slot_base(slot) + self._data_start

    def data(self, slot: int, nbytes: int | None = None) -> memoryview:
        """Writable view of a slot's data region (its first ``nbytes`` bytes)."""
        n = self.data_capacity if nbytes is None else nbytes
        if n > self.data_capacity:
            raise CapacityError(
                f"{fmt_bytes(n)} do not fit a slot of {fmt_bytes(self.data_capacity)} "
                f"in {self.path}"
            )
        start = self.data_offset(slot)
        return self._view[start : start + n]

    def state(self, slot: int) -> tuple[SlotState, int]:
        """A slot's state and commit sequence number."""
        state, seq, _, _ = _SLOT.unpack_from(self._mm, self._slot_base(slot))
        try:
            return SlotState(state), seq
        except ValueError:
            return SlotState.FREE, 0

    def mark(self, slot: int, state: SlotState) -> None:
        """Set a slot FREE or WRITING (an 8-byte aligned store; never half-done by a crash)."""
        if state is SlotState.COMMITTED:
            raise ValueError("use commit() to commit a slot")
        struct.pack_into("<Q", self._mm, self._slot_base(slot), int(state))

    def commit(self, slot: int, manifest: bytes, seq: int) -> None:
        """Record ``manifest`` for a filled slot and flip it COMMITTED (the state word last)."""
        if len(manifest) > self.manifest_capacity:
            raise CapacityError(
                f"manifest of {fmt_bytes(len(manifest))} exceeds the arena's manifest capacity "
                f"of {fmt_bytes(self.manifest_capacity)}"
            )
        base = self._slot_base(slot)
        self._mm[base + _SLOT_HEADER_SIZE : base + _SLOT_HEADER_SIZE + len(manifest)] = manifest
        mhash = digest(manifest, self._checksum)
        struct.pack_into("<QQQ", self._mm, base + 8, seq, len(manifest), mhash)
        struct.pack_into("<Q", self._mm, base, int(SlotState.COMMITTED))

    def committed(self) -> list[Committed]:
        """Every slot whose commit record is complete and whose manifest bytes are intact."""
        out = []
        for slot in range(self.n_slots):
            base = self._slot_base(slot)
            state, seq, mlen, mhash = _SLOT.unpack_from(self._mm, base)
            if state != SlotState.COMMITTED or mlen > self.manifest_capacity:
                continue
            manifest = bytes(self._mm[base + _SLOT_HEADER_SIZE : base + _SLOT_HEADER_SIZE + mlen])
            if digest(manifest, self._checksum) == mhash:
                out.append(Committed(slot, seq, manifest))
        return out

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (when no view is alive any more) and close the file descriptor."""
        try:
            self._view.release()
            self._mm.close()
        except BufferError:
            pass  # views (e.g. tensors) are still alive: the mapping goes when they do
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """Remove the file's name (memory is freed once every mapping is gone)."""
        if not self._unlinked:
            self.path.unlink(missing_ok=True)
            self._unlinked = True
