"""The PID book: every process seen, told apart from a later process reusing its PID."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from supervise._testing.poll import wait_until
from supervise._testing.procs import PidBook, SeenProcess, pid_alive, proc_stat


def test_a_process_is_a_survivor_until_it_exits() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        book = PidBook()
        book.add(child.pid, "worker (rank 0)")
        book.add(child.pid, "worker (rank 0)")  # seen twice: one process
        assert len(book) == 1
        assert [s.pid for s in book.survivors()] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert book.survivors() == []


def test_descendants_are_found_with_their_kind() -> None:
    script = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    grandchild = int(parent.stdout.readline())
    try:
        book = PidBook()
        book.add_descendants(os.getpid(), "the test")
        pids = {s.pid for s in book.survivors()}
        assert {parent.pid, grandchild} <= pids
        ours = [s for s in book.survivors() if s.pid in (parent.pid, grandchild)]
        # (other descendants of this pytest process, e.g. the runtime's guard, may be there)
        assert [s.role for s in ours] == ["process (under the test)"] * 2
    finally:
        for pid in (grandchild, parent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        parent.wait()
    wait_until(lambda: not pid_alive(grandchild), what=f"pid {grandchild} to be gone", timeout_s=10)
    assert [s for s in book.survivors() if s.pid in (parent.pid, grandchild)] == []


def test_a_reused_pid_is_not_the_process_seen() -> None:
    book = PidBook()
    me = proc_stat(os.getpid())
    assert me is not None
    book._seen[(os.getpid(), me[2] + 1)] = SeenProcess(os.getpid(), me[2] + 1, "an older one")
    assert book.survivors() == []
    book.add(os.getpid(), "the test itself")
    assert [s.role for s in book.survivors()] == ["the test itself"]
    assert book.roles() == {"an": 1, "the": 1}


def test_a_process_already_gone_is_not_recorded() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    book = PidBook()
    book.add(child.pid, "gone")
    assert len(book) == 0
