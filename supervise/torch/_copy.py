"""Moving bytes between live tensors and arena slots, fast and off the training thread.

CPU: single-threaded ``memmove`` (it releases the GIL and does not fight the training's
intra-op threads) into the preallocated, already-faulted arena. CUDA: copies on a side stream
into the arena registered as pinned memory, with an optional device staging buffer. Restore:
the copy into the live tensors runs while the checksums of the source are verified in
parallel (hash a chunk, then copy it while it is still in cache).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import torch

from supervise.snapshot.arena import Arena
from supervise.snapshot.checksum import split_balanced
from supervise.snapshot.hashing import Checksum, hasher
from supervise.snapshot.manifest import TensorEntry

log = logging.getLogger(__name__)

CHUNK: Final = 1 << 20
_DTYPES: Final = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
)}  # fmt: skip


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a manifest dtype name."""
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest name of a torch dtype."""
    return str(dtype).removeprefix("torch.")


class ArenaTensors:
    """A uint8 tensor over an arena's whole mapping, and typed views of slot tensors."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.base = torch.frombuffer(arena.buffer, dtype=torch.uint8)
        self.address = self.base.data_ptr()
        self.pinned = False

    def view(self, slot: int, e: TensorEntry) -> torch.Tensor:
        """The arena bytes of tensor ``e`` in ``slot`` as a tensor of its dtype and shape."""
        start = self.arena.data_offset(slot) + e.offset
        flat = self.base[start : start + e.nbytes]
        return flat.view(torch_dtype(e.dtype)).view(e.shape)

    def address_of(self, slot: int, e: TensorEntry) -> int:
        """Host address of tensor ``e`` in ``slot``."""
        return self.address + self.arena.data_offset(slot) + e.offset

    def pin(self) -> None:
        """Register the mapping as CUDA pinned memory (cudaHostRegister) for fast async DMA."""
        if self.pinned or not torch.cuda.is_available():
            return
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        err = cudart.cudaHostRegister(self.address, self.arena.nbytes, 0)
        if int(err) != 0:
            log.warning(
                "cudaHostRegister of %s failed (error %s): device copies will be pageable and slow",
                self.arena.path,
                int(err),
            )
            return
        self.pinned = True

    def unpin(self) -> None:
        """Undo ``pin``."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.address)  # type: ignore[no-untyped-call]
            self.pinned = False


class ArenaViews:
    """The arena this process attached to last and one ArenaTensors per arena used: shared by
    capture (which attaches as the layout grows) and restore (which attaches to load from disk).
    """

    def __init__(self) -> None:
        self.arena: Arena | None = None
        self.views: dict[str, ArenaTensors] = {}

    def of(self, arena: Arena) -> ArenaTensors:
        """The tensors over ``arena``, made once per mapping."""
        key = str(arena.path)
        views = self.views.get(key)
        if views is None or views.arena is not arena:
            views = self.views[key] = ArenaTensors(arena)
        return views

    def release(self) -> None:
        """Unpin every mapping (best effort) and forget them."""
        for v in self.views.values():
            with contextlib.suppress(Exception):
                v.unpin()
        self.views.clear()


def memcopy_into_arena(dst_address: int, src: torch.Tensor, dst_view: torch.Tensor) -> None:
    """Copy a live CPU tensor into the arena: memmove when contiguous, else torch's copy."""
    if src.device.type == "cpu" and src.is_contiguous() and not (src.is_conj() or src.is_neg()):
        n = src.numel() * src.element_size()
        if n:
            ctypes.memmove(dst_address, src.data_ptr(), n)
    else:
        dst_view.copy_(src)


def copy_and_verify(
    items: Sequence[tuple[TensorEntry, torch.Tensor, torch.Tensor, int]],
    threads: int,
    checksum: Checksum,
) -> list[str]:
    """Copy every arena view into its destination while checking the view's ``checksum``.

    ``items``: (entry, arena view, destination, arena address of the view). Returns the
    names whose checksum does not match. Contiguous CPU destinations are filled chunk by
    chunk right after each chunk is hashed (cache-hot); other destinations (CUDA,
    non-contiguous) are copied by torch on the current stream while threads hash.
    """
    fast = [
        i for i, (_, _, d, _) in enumerate(items) if d.device.type == "cpu" and d.is_contiguous()
    ]
    fast_set = set(fast)
    slow = [i for i in range(len(items)) if i not in fast_set]
    digests: list[int] = [0] * len(items)

    def hash_copy(indices: list[int]) -> None:
        for i in indices:
            e, _, dst, src_addr = items[i]
            h = hasher(checksum)
            view = (ctypes.c_char * e.nbytes).from_address(src_addr) if e.nbytes else b""
            mv = memoryview(view).cast("B") if e.nbytes else memoryview(b"")
            dst_addr = dst.data_ptr()
            copy = i in fast_set
            for start in range(0, e.nbytes, CHUNK):
                n = min(CHUNK, e.nbytes - start)
                h.update(mv[start : start + n])
                if copy:
                    ctypes.memmove(dst_addr + start, src_addr + start, n)
            digests[i] = h.intdigest()

    groups = [
        [fast[j] for j in g] for g in split_balanced([items[i][0].nbytes for i in fast], threads)
    ]
    groups += [
        [slow[j] for j in g] for g in split_balanced([items[i][0].nbytes for i in slow], threads)
    ]
    with ThreadPoolExecutor(max(1, len(groups)), thread_name_prefix="supervise-restore") as pool:
        futures = [pool.submit(hash_copy, g) for g in groups]
        with torch.no_grad():
            for i in slow:
                _, src, dst, _ = items[i]
                dst.copy_(src, non_blocking=dst.device.type == "cuda")
        for f in futures:
            f.result()
    if any(items[i][2].device.type == "cuda" for i in slow):
        torch.cuda.synchronize()
    return [items[i][0].name for i in range(len(items)) if digests[i] != items[i][0].digest]


def cuda_devices(tensors: Sequence[torch.Tensor]) -> list[torch.device]:
    """Distinct CUDA devices among ``tensors``."""
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


class CudaCapture:
    """One capture's device-to-host copies on side streams, with optional staging.

    ``released`` events mark the point after which the live tensors are no longer read (the
    optimizer may run); ``done`` events mark the end of every copy into the arena.
    """

    def __init__(self) -> None:
        self.released: list[tuple[torch.device, Any]] = []
        self.done: list[Any] = []

    def start(
        self,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        streams: dict[torch.device, Any],
        staging: dict[torch.device, torch.Tensor],
    ) -> None:
        """Issue the copies of (live CUDA tensor, pinned arena view) pairs."""
        by_dev: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for src, dst in pairs:
            by_dev.setdefault(src.device, []).append((src, dst))
        for dev, items in by_dev.items():
            stream = streams[dev]
            ready = torch.cuda.current_stream(dev).record_event()
            buf = staging.get(dev)
            budget = 0 if buf is None else buf.numel()
            staged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            direct: list[tuple[torch.Tensor, torch.Tensor]] = []
            used = 0
            for src, dst in reversed(items):  # stage the tail of the copy order
                n = src.numel() * src.element_size()
                aligned = (used + 511) // 512 * 512
                if buf is not None and aligned + n <= budget:
                    view = buf[aligned : aligned + n].view(src.dtype).view(src.shape)
                    staged.append((src, view, dst))
                    used = aligned + n
                else:
                    direct.append((src, dst))
            direct.reverse()
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                for src, view, _ in staged:
                    view.copy_(src, non_blocking=True)
                for src, dst in direct:
                    dst.copy_(src, non_blocking=True)
                self.released.append((dev, stream.record_event()))
                for _, view, dst in staged:
                    dst.copy_(view, non_blocking=True)
                self.done.append(stream.record_event())
            for src, _ in items:
                src.record_stream(stream)

    def release_wait(self) -> None:
        """Make the current streams wait (on the device, not the host) until the live
        tensors have been read."""
        for dev, ev in self.released:
            if not ev.query():
                torch.cuda.current_stream(dev).wait_event(ev)

    def synchronize(self) -> None:
        """Block the calling (background) thread until every copy landed in the arena."""
        for ev in self.done:
            ev.synchronize()
