"""Capacity checks made before any allocation: the RAM budget for arenas and replicas,
and the free space of the shared-memory (or disk) directory."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from supervise.snapshot.errors import CapacityError


def fmt_bytes(n: int | float) -> str:
    """Human-readable byte count (binary units)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def total_ram() -> int:
    """Physical RAM of this machine in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_free_space(directory: str | os.PathLike[str], nbytes: int, what: str) -> None:
    """Raise CapacityError unless ``directory``'s filesystem has ``nbytes`` free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        size = st.f_blocks * st.f_frsize
        hint = (
            " (enlarge /dev/shm, e.g. docker --shm-size, or lower retention.keep_last/keep_best)"
            if str(directory).startswith("/dev/shm")
            else ""
        )
        raise CapacityError(
            f"{what} needs {fmt_bytes(nbytes)} but {Path(directory)} has only "
            f"{fmt_bytes(free)} free of {fmt_bytes(size)}{hint}"
        )


class MemoryBudget:
    """Host RAM that arenas and peers' replicas may hold together (``retention.memory_budget``).

    Thread-safe; shared by everything on a node that keeps snapshots in RAM. When a reservation
    does not fit, the registered reclaimers (e.g. the replica store's older replicas and pushes
    in flight) are asked to give memory back before it is refused.
    """

    def __init__(self, limit: int, *, source: str = "retention.memory_budget") -> None:
        if limit < 0:
            raise ValueError(f"memory budget must be >= 0, got {limit}")
        self.limit = limit
        self.source = source
        self._held = 0
        self._lock = threading.Lock()
        self._reclaimers: list[Callable[[int], int]] = []

    @property
    def held(self) -> int:
        """Bytes reserved now."""
        return self._held

    @property
    def free(self) -> int:
        """Bytes that can still be reserved without reclaiming anything."""
        return self.limit - self._held

    def add_reclaimer(self, reclaim: Callable[[int], int]) -> None:
        """``reclaim(nbytes)`` frees (and releases) up to ``nbytes`` it can spare
        and returns how much; it runs in the thread that reserves, outside the lock."""
        self._reclaimers.append(reclaim)

    def remove_reclaimer(self, reclaim: Callable[[int], int]) -> None:
        with contextlib.suppress(ValueError):
            self._reclaimers.remove(reclaim)

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` if they fit now (no reclaiming); whether they did."""
        with self._lock:
            if self._held + nbytes > self.limit:
                return False
            self._held += nbytes
            return True

    def reserve(self, nbytes: int, what: str) -> None:
        """Reserve ``nbytes`` (reclaiming spare memory if needed) or raise CapacityError
        saying what did not fit."""
        if self.try_reserve(nbytes):
            return
        for reclaim in list(self._reclaimers):
            reclaim(nbytes - self.free)
            if self.try_reserve(nbytes):
                return
        with self._lock:
            raise CapacityError(
                f"{what} needs {fmt_bytes(nbytes)} but the RAM budget ({self.source} = "
                f"{fmt_bytes(self.limit)}) has only {fmt_bytes(self.limit - self._held)} left "
                f"({fmt_bytes(self._held)} held)"
            )

    def release(self, nbytes: int) -> None:
        """Give back what ``reserve`` took."""
        with self._lock:
            self._held = max(0, self._held - nbytes)
