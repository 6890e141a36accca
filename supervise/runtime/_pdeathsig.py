"""Linux: have the kernel SIGKILL an OS-process child when its parent dies, even by kill -9.

`prctl(PR_SET_PDEATHSIG)` must run in the child between fork and exec, so it is a
``preexec_fn``. The signal fires when the *thread* that forked the child exits, so children
are forked by `_spawn`'s one long-lived thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def preexec_for(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` arming the parent-death signal, or None where the OS has none."""
    prctl = _prctl
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def arm() -> None:
        # Runs in the forked child: bound names only, no imports.
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os.kill(os.getpid(), sigkill)

    return arm


_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


def set_child_subreaper(on: bool) -> bool:
    """Make this process the reaper of its orphaned descendants (Linux >= 3.4): a process
    forked by one of our children becomes our child once its own parent exits. Returns
    whether the OS did it (False where it has no such thing)."""
    prctl = _prctl
    return prctl is not None and prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def child_subreaper() -> bool | None:
    """Whether this process is a child subreaper now (None: the OS has no such thing)."""
    prctl = _prctl
    if prctl is None:
        return None
    flag = ctypes.c_int(0)
    if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.addressof(flag), 0, 0, 0) != 0:
        return None
    return bool(flag.value)
