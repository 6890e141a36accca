from pathlib import Path

import pytest

from supervise.snapshot import Arena, CapacityError, CorruptSnapshot, MemoryBudget, SlotState


def test_commit_is_visible_only_when_complete(tmp_path: Path) -> None:
    a = Arena.create(tmp_path / "a.arena", data_capacity=10_000, n_slots=2, rank=3)
    assert a.data_capacity >= 10_000 and a.rank == 3
    a.mark(0, SlotState.WRITING)
    a.data(0)[:4] = b"abcd"
    assert a.committed() == []  # a half-written slot is never a version
    a.commit(0, b"manifest-0", seq=1)
    other = Arena.open(tmp_path / "a.arena")
    assert [(c.slot, c.seq, c.manifest) for c in other.committed()] == [(0, 1, b"manifest-0")]
    assert bytes(other.data(0, 4)) == b"abcd"
    other.close()
    a.close()


def test_crash_mid_write_leaves_the_committed_slot_intact(tmp_path: Path) -> None:
    a = Arena.create(tmp_path / "a.arena", data_capacity=4096, n_slots=2)
    a.data(0)[:3] = b"old"
    a.commit(0, b"m0", seq=1)
    a.mark(1, SlotState.WRITING)
    a.data(1)[:3] = b"new"  # ... and the writer dies here
    a.close()
    b = Arena.open(tmp_path / "a.arena")
    assert [c.slot for c in b.committed()] == [0]
    assert bytes(b.data(0, 3)) == b"old"
    assert b.state(1)[0] is SlotState.WRITING
    b.close()


def test_damaged_manifest_record_is_not_committed(tmp_path: Path) -> None:
    a = Arena.create(tmp_path / "a.arena", data_capacity=4096, n_slots=1)
    a.commit(0, b"hello manifest", seq=1)
    base = 4096 + 64
    a.buffer[base] ^= 0xFF
    assert a.committed() == []
    a.close()


def test_open_rejects_foreign_files(tmp_path: Path) -> None:
    p = tmp_path / "x.arena"
    p.write_bytes(b"\0" * 8192)
    with pytest.raises(CorruptSnapshot, match="not a supervise arena"):
        Arena.open(p)


def test_bad_geometry_and_oversized_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_slots"):
        Arena.create(tmp_path / "a", data_capacity=1, n_slots=0)
    a = Arena.create(tmp_path / "b", data_capacity=4096, n_slots=1, manifest_capacity=1024)
    with pytest.raises(CapacityError, match="do not fit"):
        a.data(0, 1 << 20)
    with pytest.raises(CapacityError, match="manifest capacity"):
        a.commit(0, b"x" * 5000, seq=1)
    a.close()


def test_too_small_shm_is_a_clear_error(tiny_tmpfs: Path) -> None:
    with pytest.raises(CapacityError, match=r"needs .* but .* has only .* free"):
        Arena.create(tiny_tmpfs / "big.arena", data_capacity=8 << 20, n_slots=2)
    assert list(tiny_tmpfs.iterdir()) == []  # nothing half-created


def test_memory_budget() -> None:
    b = MemoryBudget(1000, source="retention.memory_budget")
    b.reserve(600, "arena 1")
    with pytest.raises(
        CapacityError, match=r"arena 2 needs 500 B but the RAM budget .* 400 B left"
    ):
        b.reserve(500, "arena 2")
    b.release(600)
    b.reserve(1000, "arena 3")
    assert b.held == 1000
