"""Receive buffers: fresh anonymous memory, and the allocator tuning for bulk receivers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervise.cluster._buffers import Slab, anonymous

MiB = 1 << 20

_PROBE = "from supervise.cluster._malloc import keep_receive_buffers as k; print(k(), k())"


def test_anonymous_buffers_are_zeroed_writable_and_sized() -> None:
    view = anonymous(3 * MiB + 5)
    assert len(view) == 3 * MiB + 5 and not view.readonly
    assert not any(view[::4096]) and view[-1] == 0
    view[-1] = 7
    assert view[-1] == 7
    slab = Slab(10)
    assert slab.capacity == os.sysconf("SC_PAGE_SIZE")
    slab.release()


def test_prefault_maps_pages_without_touching_their_contents() -> None:
    slab = Slab(9 * MiB)
    slab.view[: 5 * MiB] = b"\xab" * (5 * MiB)  # data already written ...
    if not slab.prefault():  # ... and the kernel maps the rest
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14+")
    assert slab.view[0] == slab.view[5 * MiB - 1] == 0xAB and slab.view[5 * MiB] == 0
    assert slab.fresh  # prefault() itself does not claim the slab; prefault_soon() does
    slab.prefault_soon()
    assert not slab.fresh
    slab.release()
    assert slab.prefault() is False  # released: nothing to map


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    clean.pop("SUPERVISE_MALLOC_TUNING", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\n")[-2]


@pytest.mark.skipif(
    not hasattr(os, "confstr") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)
def test_malloc_tuning_once_and_only_where_the_user_did_not_tune() -> None:
    assert _probe() == "True True"
    assert _probe(SUPERVISE_MALLOC_TUNING="0") == "False False"
    assert _probe(MALLOC_TRIM_THRESHOLD_="1000000") == "False False"
    assert _probe(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536") == "False False"


_REUSE = """
import ctypes, resource, sys, threading
from supervise.cluster._malloc import keep_receive_buffers
if sys.argv[1] == "tuned":
    keep_receive_buffers()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
CHUNK = 8 << 20
faults = []

def rounds():  # like libzmq's I/O thread: a chunk buffer per message, freed once consumed
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        bufs = [libc.malloc(CHUNK) for _ in range(10)]
        for b in bufs:
            ctypes.memset(b, 1, CHUNK)
        for b in bufs:
            libc.free(b)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

t = threading.Thread(target=rounds)
t.start()
t.join()
print(faults[-1])
"""


@pytest.mark.skipif(
    not hasattr(os, "confstr") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)
def test_tuned_malloc_keeps_a_threads_chunk_buffers_mapped_for_reuse() -> None:
    """A thread's arena keeps its freed chunk buffers (10 x 8 MiB: more than one 64 MiB heap)
    mapped once tuned. With only the mmap and trim thresholds raised, glibc still unmaps each
    heap of the thread's arena that became entirely free, and every round faults them in again.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    clean.pop("SUPERVISE_MALLOC_TUNING", None)

    def last_round_faults(mode: str, **env: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _REUSE, mode],
            env={**clean, **env},
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    assert last_round_faults("tuned") < 200  # 80 MiB touched again, (almost) nothing faulted
    thresholds_only = {
        "MALLOC_MMAP_THRESHOLD_": str(32 * MiB),
        "MALLOC_TRIM_THRESHOLD_": str(256 * MiB),
    }
    assert last_round_faults("untuned", **thresholds_only) > 2000
