"""Page-aligned buffers for fetched shards.

Fresh anonymous memory costs a page fault per page on first touch (0.15-3 GB/s on the
project's virtual machines, often slower than the network), so every buffer
asks for transparent huge pages (fewer faults, fewer TLB misses when copying and hashing); and
a fresh one can be faulted in ahead of the data by another thread (:meth:`Slab.prefault`,
``MADV_POPULATE_WRITE``: the kernel maps the pages without touching their contents, so data
may be written into them at the same time).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import threading
from collections.abc import Callable

PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PREFAULT_STEP = 64 << 20


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise through ctypes (which releases the GIL while it runs), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def advise_huge(mm: mmap.mmap) -> None:
    """Ask for transparent huge pages (a hint: ignored where THP is off or unsupported)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and len(mm) >= HUGE_PAGE:
        with contextlib.suppress(OSError):
            mm.madvise(advice)


def anonymous(nbytes: int) -> memoryview:
    """A writable, zeroed buffer of ``nbytes`` in fresh anonymous memory (huge pages where
    the kernel allows), faulted in by a background thread ahead of its first writes; the
    memory goes back to the OS when the last view of it is gone.
    """
    slab = Slab(nbytes)
    slab.prefault_soon()
    return slab.view[:nbytes]


class Slab:
    """One anonymous mapping; ``view`` is a writable memoryview of all of it; ``fresh``
    until a prefault of it was started.
    """

    __slots__ = ("_mm", "capacity", "fresh", "released", "view")

    def __init__(self, capacity: int) -> None:
        self.capacity = round_up(max(capacity, 1))
        self._mm = mmap.mmap(-1, self.capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advise_huge(self._mm)
        self.view = memoryview(self._mm)
        self.fresh = True
        self.released = False

    def prefault(self) -> bool:
        """Fault every page in, front to back, without changing any byte (blocking, without
        the GIL: run it in a worker thread while data arrives). False where the kernel cannot
        (before Linux 5.14) or once the slab was released.
        """
        madvise = _madvise()
        if madvise is None:
            return False
        try:  # the anchor keeps the mapping alive while the kernel populates it
            anchor = (ctypes.c_char * self.capacity).from_buffer(self._mm)
        except (ValueError, TypeError, BufferError):  # released meanwhile
            return False
        try:
            base = ctypes.addressof(anchor)
            for off in range(0, self.capacity, _PREFAULT_STEP):
                if self.released:
                    return False
                n = min(_PREFAULT_STEP, self.capacity - off)
                if madvise(base + off, n, MADV_POPULATE_WRITE) != 0:
                    return False
        finally:
            del anchor
        return True

    def prefault_soon(self) -> None:
        """:meth:`prefault` in a daemon thread (once, and only while the slab is fresh): the
        kernel maps the pages ahead of the data that is about to be written into them.
        """
        if self.fresh and not self.released:
            self.fresh = False
            threading.Thread(target=self.prefault, name="supervise-prefault", daemon=True).start()

    def release(self) -> None:
        """Give the memory back to the OS (once no view of it is alive any more)."""
        self.released = True
        self.view.release()
        # a view still exported (a zero-copy send in flight): the memory goes with it
        with contextlib.suppress(BufferError):
            self._mm.close()
