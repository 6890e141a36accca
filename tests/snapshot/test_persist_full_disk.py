"""A full persist disk: the Persister frees what retention allows and writes; when even that
is not enough it says once (not per snapshot) that the tier is behind, since which step, and
how far back a restart from disk would go; a later write that succeeds says it caught up."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
from snaphelp import make_service
from test_service import commit_version

from supervise.snapshot import PersistTier
from supervise.snapshot import persist as persist_mod
from supervise.snapshot.client import LocalOwner
from supervise.snapshot.persist import Persister


def test_full_disk_frees_older_versions_then_says_once_that_the_tier_is_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="supervise.snapshot.persist")
    svc = make_service(tmp_path / "shm", keep_last=1)
    tier = PersistTier(tmp_path / "ckpt", rank=0, keep=2)
    persister = Persister(svc, lambda _rank: tier, every=1)
    svc.add_commit_hook(persister.on_commit)
    owner = LocalOwner(svc, 0)

    def on_disk() -> list[int]:
        return [e.manifest.step for e in tier.entries()]

    def commit(step: int) -> None:
        commit_version(owner, step)
        persister.flush()

    real_write = persist_mod._write_all
    room = {"files": 99}  # how many shard files the disk can hold

    def write_all(fd: int, buf: memoryview) -> None:
        if len(on_disk()) >= room["files"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, buf)

    monkeypatch.setattr(persist_mod, "_write_all", write_all)
    try:
        commit(1)
        commit(2)
        assert on_disk() == [1, 2]

        room["files"] = 2  # full: version 1 (which keep = 2 drops after 3 anyway) goes first
        commit(3)
        assert on_disk() == [2, 3]
        assert "removed older versions to make room" in caplog.text
        assert "behind" not in caplog.text

        room["files"] = 0  # nothing fits any more: said once, with the step it fell behind at
        caplog.clear()
        for step in (4, 5, 6):
            commit(step)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        message = errors[0].getMessage()
        assert "persist tier is behind for rank 0 since step 4" in message
        assert "go back to version 3" in message
        assert on_disk() == [3]  # the newest one on disk is never removed to make room
        assert persister.behind == {0: 4}

        room["files"] = 99
        caplog.clear()
        commit(7)
        assert on_disk() == [3, 7]
        assert "caught up for rank 0 at step 7 (behind since step 4)" in caplog.text
        assert persister.behind == {}
    finally:
        persister.close()
        svc.close()


def test_keep_one_never_removes_the_only_version_to_make_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=1)
    svc = make_service(tmp_path / "shm", keep_last=1)
    owner = LocalOwner(svc, 0)
    persister = Persister(svc, lambda _rank: tier, every=1)
    svc.add_commit_hook(persister.on_commit)
    try:
        commit_version(owner, 1)
        persister.flush()

        def full(fd: int, buf: memoryview) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(persist_mod, "_write_all", full)
        commit_version(owner, 2)
        persister.flush()
        assert [e.manifest.step for e in tier.entries()] == [1]
        assert persister.behind == {0: 2}
    finally:
        persister.close()
        svc.close()


def test_a_shard_with_no_tier_stays_in_ram_and_unpinned(tmp_path: Path) -> None:
    """A farm node's task journals share the agent's arenas with no persist tier of their
    own: the persister leaves them alone (it used to pin the slot for good and raise)."""
    tier = PersistTier(tmp_path, rank=0, keep=1)
    svc = make_service(tmp_path / "shm", keep_last=1)
    persister = Persister(svc, {0: tier}.__getitem__, every=1)
    svc.add_commit_hook(persister.on_commit)
    try:
        task = LocalOwner(svc, 1)
        commit_version(task, 1)
        commit_version(task, 2)
        persister.flush()
        assert tier.entries() == []
        assert svc.release(1)  # nothing of it pinned
    finally:
        persister.close()
        svc.close()
