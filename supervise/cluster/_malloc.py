"""Keep glibc from giving libzmq's receive buffers back to the kernel between messages.

libzmq mallocs one buffer per large message it receives and frees it once the message is
consumed. With glibc's defaults, free memory at the top of a heap is trimmed (returned to
the kernel) as soon as a few MiB of it are free, so the buffer of the next message is fresh
memory again: a page fault every 4 KiB inside libzmq's I/O thread, ~0.3 CPU-s per GiB received
on the project's machines, more than the copy and the checksum together. Pinning the mmap
threshold above the chunk sizes and raising the trim threshold keeps those buffers in the
arena for reuse: a replica holder keeps the buffers of each version it holds (they *are* the
replica) and receives the next version into those of the one it supersedes.
libzmq's I/O thread allocates from its own arena, made of 64 MiB heaps that glibc unmaps as
soon as one is entirely free, whatever the trim threshold: a top pad of a whole heap keeps
them (without it, every fetch faulted one or two chunk buffers in afresh).

Process-wide, once, and only for processes that receive bulk data (replica holders and
fetchers). Skipped when libc is not glibc, when the user tuned malloc (``MALLOC_*_``
variables or ``glibc.malloc`` tunables), or with ``SUPERVISE_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

import structlog

log = structlog.get_logger("supervise.cluster.malloc")

MiB = 1 << 20
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * MiB  # glibc's largest allowed on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 * MiB
TOP_PAD = 64 * MiB  # glibc's heap size for threads' arenas on 64-bit (HEAP_MAX_SIZE)
_USER_KNOBS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_tuned() -> str | None:
    """Why not to touch malloc: the user's own settings win."""
    if os.environ.get("SUPERVISE_MALLOC_TUNING", "1").strip().lower() in {"0", "false", "no"}:
        return "SUPERVISE_MALLOC_TUNING=0"
    for name in _USER_KNOBS:
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


@functools.cache
def keep_receive_buffers() -> bool:
    """Tune glibc malloc for bulk receiving, once per process; True when in effect."""
    why_not = _user_tuned()
    if why_not is not None or not _is_glibc():
        log.debug("malloc left alone", reason=why_not or "not glibc")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok: bool = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    ok = mallopt(M_TOP_PAD, TOP_PAD) == 1 and ok
    log.debug("malloc tuned for bulk receives", ok=ok, mmap_threshold=MMAP_THRESHOLD)
    return ok


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not _is_glibc():
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


def give_back_free_memory() -> None:
    """Return the free memory of every malloc arena to the kernel now (glibc's
    ``malloc_trim``): after dropping received buffers that are not about to be reused."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
