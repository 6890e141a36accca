"""What a node agent leaves on the machine: its run dir (ipc sockets, spares' orders) and its
snapshot arenas. An agent killed with -9 leaves both; its next start clears the run dir (owner
PID and start time dead) and adopts the arenas; a clean stop leaves nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from nodekit import nodes

from supervise.agents.preflight import StartupError
from supervise.agents.rundir import (
    OWNER_FILE,
    NodeLock,
    claim_run_dir,
    dead_nodes_arenas,
    process_start_ticks,
    remove_stale_run_dirs,
)
from supervise.snapshot import ArenaService, CorruptSnapshot, MemoryBudget, RetentionRule
from supervise.snapshot.arena import Arena


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir for the agents' TMPDIR (an ipc socket path has at most ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_dirs(base: Path) -> list[Path]:
    return sorted(base.glob("supervise-n*-*"))


@pytest.mark.slow
def test_kill_9_leaves_nothing_that_the_next_start_does_not_clear(
    tmp_path: Path, short_tmp: Path
) -> None:
    with nodes(tmp_path, 1, steps=100_000, env={"TMPDIR": str(short_tmp)}) as c:
        with hangup(signal.SIG_IGN):  # started under nohup: a hang-up is left to be ignored
            c.start_all()
        c.wait_resumed(1)
        assert _sighup(c.agents[0].pid) == "ignored"
        c.wait("a committed snapshot", lambda: _committed(c.shm(0)))
        [first] = run_dirs(short_tmp)
        assert (first / OWNER_FILE).read_text().split()[0] == str(c.agents[0].pid)
        c.kill_node(0, wipe_ram=False)
        # what kill -9 leaves: the run dir (its owner dead), the arenas (kept to be adopted)
        # and the node's lock file (its lock gone with the process)
        assert first.exists()
        assert _arenas(c.shm(0))
        assert list(c.shm(0).glob("supervise-node0-*.lock"))

        with hangup(signal.SIG_DFL):  # started from a shell: a hang-up stops it
            c.start(0, keep_ram=True)  # the same node restarted in place: same port, same RAM
        c.wait_resumed(1)
        assert _sighup(c.agents[0].pid) == "caught"
        assert not first.exists(), "the next start did not remove the dead agent's run dir"
        assert len(run_dirs(short_tmp)) == 1
        assert any("adopted arenas for ranks [0]" in str(e.get("event")) for e in c.events(0))

        c.send(0, signal.SIGHUP)  # a hang-up stops it in order too
        assert c.wait_exit(0) == 128 + signal.SIGHUP
        assert run_dirs(short_tmp) == [], "a clean stop left its run dir"
        assert list(c.shm(0).iterdir()) == [], "a clean stop left arenas or its lock"
        assert c.orphans() == []


@contextmanager
def hangup(disposition: signal.Handlers) -> Iterator[None]:
    """SIGHUP's disposition for the agents started inside (a child inherits SIG_IGN/SIG_DFL),
    whatever this test run inherited (``nohup make test`` ignores it)."""
    before = signal.signal(signal.SIGHUP, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)


def _sighup(pid: int) -> str:
    """What process ``pid`` does with SIGHUP, read from its /proc status masks."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = {k: v.strip() for k, _, v in (line.partition(":") for line in status)}
    bit = 1 << (signal.SIGHUP - 1)
    if int(masks["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(masks["SigCgt"], 16) & bit else "default"


def _arenas(shm: Path) -> list[Path]:
    return sorted(shm.glob("supervise-*.arena"))


def _committed(shm: Path) -> bool:
    for path in _arenas(shm):
        try:
            arena = Arena.open(path)
        except (OSError, CorruptSnapshot):
            continue  # being created
        try:
            if arena.committed():
                return True
        finally:
            arena.close()
    return False


def test_stale_run_dirs_go_by_dead_owner_never_by_name(short_tmp: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = process_start_ticks(sleeper.pid)
        assert ticks is not None

        def made(name: str, owner: str | None) -> Path:
            d = short_tmp / name
            d.mkdir()
            (d / "agent.sock").touch()
            if owner is not None:
                (d / OWNER_FILE).write_text(owner)
            return d

        live = made("supervise-n0-live", f"{sleeper.pid} {ticks}")
        reused = made("supervise-n1-reused", f"{sleeper.pid} {ticks + 1}")  # PID of another
        dead = made("supervise-n2-dead", f"{_dead_pid()} 1")
        ownerless = made("supervise-n3-noowner", None)
        other = made("something-else", f"{_dead_pid()} 1")

        assert sorted(remove_stale_run_dirs(short_tmp)) == sorted([reused, dead])
        assert live.exists() and ownerless.exists() and other.exists()

        mine = claim_run_dir(5, short_tmp)
        assert mine.name.startswith("supervise-n5-")
        assert (mine / OWNER_FILE).read_text().split() == [
            str(os.getpid()),
            str(process_start_ticks(os.getpid())),
        ]
        assert remove_stale_run_dirs(short_tmp) == []  # its own is alive
    finally:
        sleeper.kill()
        sleeper.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_arena_left_half_created_is_removed_when_its_node_adopts(tmp_path: Path) -> None:
    # an agent killed between creating the arena file and writing its header
    half = tmp_path / "supervise-n0-r00000-0000.arena"
    half.write_bytes(bytes(1 << 16))
    foreign = tmp_path / "supervise-n9-r00000-0000.arena"  # another node's: not ours to judge
    foreign.write_bytes(bytes(1 << 16))
    svc = ArenaService(
        tmp_path, rule=RetentionRule(keep_last=1), budget=MemoryBudget(1 << 30), node="n0"
    )
    try:
        assert not half.exists()
        assert foreign.exists()
    finally:
        svc.close()


def test_one_agent_at_a_time_owns_a_node_and_kill_9_frees_it(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from supervise.agents.rundir import NodeLock\n"
        f"NodeLock({str(tmp_path)!r}, 'node0-7000')\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(
            StartupError, match=f"another agent of node0-7000 \\(pid {holder.pid}\\)"
        ):
            NodeLock(tmp_path, "node0-7000")
        NodeLock(tmp_path, "node1-7000").release()  # another node: its own lock
    finally:
        holder.kill()
        holder.wait()
    lock = NodeLock(tmp_path, "node0-7000")  # the kernel dropped the dead holder's lock
    lock.release()
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_agents_arenas_of_another_node_are_reported_not_removed(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for node, owner in {
            "node1-7001": f"{_dead_pid()} 1",  # killed with -9: its lock file stayed
            "node2-7002": f"{sleeper.pid} {process_start_ticks(sleeper.pid)}",  # alive
        }.items():
            (tmp_path / f"supervise-{node}.lock").write_text(owner)
            (tmp_path / f"supervise-{node}-r00001-0000.arena").write_bytes(b"x")
        (tmp_path / "supervise-node0-7000-r00000-0000.arena").write_bytes(b"x")  # our own
        assert dead_nodes_arenas(tmp_path, "node0-7000") == {
            "node1-7001": [tmp_path / "supervise-node1-7001-r00001-0000.arena"]
        }
        assert len(list(tmp_path.iterdir())) == 5  # nothing removed
    finally:
        sleeper.kill()
        sleeper.wait()
