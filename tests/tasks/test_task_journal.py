"""The on-disk journal: commits are whole or absent; a torn, truncated or corrupted commit file
is never used (its steps simply run again), and an outcome is read back as written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from supervise.snapshot import ArenaService, LocalOwner, MemoryBudget, RetentionRule
from supervise.snapshot.client import AgentClient
from supervise.snapshot.errors import SnapshotError
from supervise.tasks import (
    CorruptRecord,
    DiskJournal,
    MemoryJournal,
    Outcome,
    TaskSpec,
    WorkerProcess,
    open_journal_host,
)
from supervise.tasks.arena_journal import ArenaJournal
from supervise.tasks.journal import Commit, StepRecord, unseal


def _commit(name: str, value: bytes, state: bytes | None = None, progress: float = 0.0) -> Commit:
    return Commit(1, (StepRecord(name, f"t/{name}", value, 1),), state, progress)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_commits_fold_into_steps_state_and_progress(tmp_path: Path, kind: str) -> None:
    j = MemoryJournal() if kind == "memory" else DiskJournal(tmp_path)
    j.commit(_commit("a", b"1", b"s1", 0.5))
    j.commit(_commit("b", b"2", None, 0.25))
    view = (DiskJournal(tmp_path) if kind == "disk" else j).read()
    assert {n: s.value for n, s in view.steps.items()} == {"a": b"1", "b": b"2"}
    assert (view.state, view.progress, view.commits) == (b"s1", 0.5, 2)
    assert j.outcome() is None
    j.finish(Outcome(2, error_type="m.E", error_mro=("m.E",), message="boom"))
    assert j.outcome() == Outcome(2, None, "m.E", ("m.E",), "boom")


def test_a_damaged_commit_file_is_never_used(tmp_path: Path) -> None:
    j = DiskJournal(tmp_path)
    for name in ("a", "b", "c"):
        j.commit(_commit(name, name.encode() * 100))
    files = sorted(tmp_path.glob("commit-*.rec"))
    files[1].write_bytes(files[1].read_bytes()[:-7])  # torn
    data = bytearray(files[2].read_bytes())
    data[-1] ^= 0xFF  # a flipped bit
    files[2].write_bytes(bytes(data))
    (tmp_path / ".commit-00000004.rec.1.tmp").write_bytes(b"half")  # a crash mid-write
    (tmp_path / "commit-copy.rec").write_bytes(b"stray")  # not one of its files
    view = j.read()
    assert list(view.steps) == ["a"]
    assert view.dropped == 3
    j.commit(_commit("b", b"again"))  # the journal goes on after the damage
    assert DiskJournal(tmp_path).read().steps["b"].value == b"again"


def test_unseal_says_what_is_wrong_in_one_line() -> None:
    with pytest.raises(CorruptRecord, match=r"^f: 3 bytes is shorter than a record header$"):
        unseal(b"abc", "f")
    with pytest.raises(CorruptRecord, match=r"^f: not a task journal record"):
        unseal(b"x" * 40, "f")


def _service(tmp_path: Path) -> ArenaService:
    return ArenaService(
        tmp_path / "shm", rule=RetentionRule(), budget=MemoryBudget(1 << 30), anonymous=True
    )


def test_the_arena_journal_outlives_its_writer_and_skips_a_corrupt_version(
    tmp_path: Path,
) -> None:
    service = _service(tmp_path)
    try:
        writer = ArenaJournal(LocalOwner(service, rank=7))
        writer.commit(_commit("a", b"x" * 70_000, b"s", 0.5))  # grows the arena on the way
        writer.commit(_commit("b", b"y"))
        writer.finish(Outcome(1, value=b"done"))
        # the writer's process is gone; the arena's owner (the agent) still holds the journal
        view = ArenaJournal(LocalOwner(service, rank=7)).read()
        assert list(view.steps) == ["a", "b"] and (view.state, view.progress) == (b"s", 0.5)
        assert ArenaJournal(LocalOwner(service, rank=7)).outcome() == Outcome(1, value=b"done")
        newest = service.restore(7, "latest")[0]
        service.arena(newest.arena).data(newest.slot, 2000)[1000] ^= 0xFF  # inside step a
        fresh = ArenaJournal(LocalOwner(service, rank=7))  # never uses the damaged version
        assert (fresh.read().steps, fresh.read().dropped, fresh.outcome()) == ({}, 1, None)
        fresh.commit(_commit("c", b"z"))
        assert list(ArenaJournal(LocalOwner(service, rank=7)).read().steps) == ["c"]
    finally:
        service.close()


async def test_a_journal_served_to_another_process_grows_past_several_arenas() -> None:
    """Through the local endpoint, as a worker writes it: each growth maps a new arena (a
    dropped arena's name is never reused, or the client would write to the old mapping)."""
    async with open_journal_host() as host:
        old = host.token(0, 1)

        def worker() -> None:
            client = AgentClient(host.endpoint, 0, token=host.token(0, 2))
            j = ArenaJournal(client)
            for i in range(4):
                j.commit(_commit(f"s{i}", bytes([i]) * (60_000 * 2**i)))
            client.close()
            # no other process of the user, nor the previous attempt's worker, writes it
            for token in ("", "forged", old):
                stranger = AgentClient(host.endpoint, 0, token=token, timeout=5)
                try:
                    with pytest.raises(SnapshotError, match="token"):
                        ArenaJournal(stranger)
                finally:
                    stranger.close()

        await trio.to_thread.run_sync(worker)
        assert host.service.refused["unauthorized"] == 3
        view = host.journal(0).read()
        assert [len(s.value) for s in view.steps.values()] == [60_000, 120_000, 240_000, 480_000]
        assert all(s.value == bytes([i]) * len(s.value) for i, s in enumerate(view.steps.values()))


def test_task_directories_and_journal_files_are_private_under_umask_0(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        spec = TaskSpec("taskfuncs:two_steps", (21,), task_id="t")
        WorkerProcess(spec, tmp_path / "tasks" / "t")
        journal = DiskJournal(tmp_path / "tasks" / "t" / "journal")
        journal.commit(_commit("a", b"x"))
        journal.finish(Outcome(1, value=b"done"))
    finally:
        os.umask(old)
    for d in (tmp_path / "tasks", tmp_path / "tasks" / "t", journal.path):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = [tmp_path / "tasks" / "t" / "spec.rec", *journal.path.iterdir()]
    assert len(files) == 3 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
