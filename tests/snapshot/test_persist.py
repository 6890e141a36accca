import json
import logging
import struct
from pathlib import Path

import pytest

from supervise.snapshot import (
    CapacityError,
    CorruptSnapshot,
    Layout,
    Manifest,
    PersistTier,
    TensorEntry,
)
from supervise.snapshot.checksum import digests
from supervise.snapshot.errors import FinishedJob
from supervise.snapshot.persist import CORRUPT_SUFFIX, check_resumable, job_fingerprint


def shard(step: int, rank: int = 0, seed: int = 1) -> tuple[Manifest, bytearray]:
    layout = Layout.plan(
        [
            ("w", "float32", (4, 3)),
            ("h", "bfloat16", (5,)),
            ("n", "int64", (2,)),
            ("e", "float32", (0,)),
        ]
    )
    data = bytearray((i * seed + step) % 251 for i in range(layout.nbytes))
    sums = digests(layout.entries, memoryview(data))
    tensors = tuple(
        TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes, h)
        for e, h in zip(layout.entries, sums, strict=True)
    )
    m = Manifest(
        step=step,
        generation=0,
        rank=rank,
        world_size=2,
        nbytes=layout.nbytes,
        tensors=tensors,
        wall_time=float(step),
        metrics={"loss": 1.0 / (step + 1)},
    )
    return m, data


def test_write_is_a_valid_safetensors_file_and_reads_back(tmp_path: Path) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2)
    m, data = shard(5)
    path = tier.write(m, memoryview(data))
    assert path.name == "step-000000000005.rank-00000.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0
    assert (
        header["h"]["dtype"] == "BF16"
        and header["e"]["data_offsets"][0] == header["e"]["data_offsets"][1]
    )
    assert raw[8 + n :] == bytes(data)
    [entry] = tier.entries()
    assert entry.manifest == m
    buf = bytearray(m.nbytes)
    tier.load(entry, memoryview(buf))
    assert buf == data


def test_real_safetensors_reads_our_files(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    tier = PersistTier(tmp_path, rank=1, keep=1)
    m, data = shard(3, rank=1)
    loaded = st.load_file(str(tier.write(m, memoryview(data))))
    assert loaded["h"].dtype == torch.bfloat16 and loaded["w"].shape == (4, 3)
    w = next(t for t in m.tensors if t.name == "w")
    assert loaded["w"].numpy().tobytes() == bytes(data[w.offset : w.offset + w.nbytes])


def test_flipped_byte_on_disk_is_detected_and_quarantined(tmp_path: Path) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2)
    m, data = shard(1)
    path = tier.write(m, memoryview(data))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(raw)
    [entry] = tier.entries()  # the header is intact: only loading finds the damage
    with pytest.raises(CorruptSnapshot, match="checksum mismatch"):
        tier.load(entry, memoryview(bytearray(m.nbytes)))
    # Renamed aside: no later listing offers it again (a restart falls back instead).
    assert tier.entries() == []
    assert (tmp_path / f"{path.name}{CORRUPT_SUFFIX}").read_bytes() == bytes(raw)


def test_corrupt_file_that_cannot_be_renamed_is_remembered_as_bad(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2)
    m, data = shard(1)
    path = tier.write(m, memoryview(data))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(raw)
    [entry] = tier.entries()
    real_replace = Path.replace

    def refuse(self: Path, target: Path) -> Path:
        if str(target).endswith(CORRUPT_SUFFIX):
            raise PermissionError(13, "read-only file system")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", refuse)
    with pytest.raises(CorruptSnapshot):
        tier.load(entry, memoryview(bytearray(m.nbytes)))
    assert path.exists() and tier.entries() == []  # still there, never offered again
    tier.write(m, memoryview(data))  # written anew: a good file again
    assert [e.path for e in tier.entries()] == [path]


def test_file_truncated_under_a_listed_entry_is_quarantined_on_load(tmp_path: Path) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2)
    m, data = shard(1)
    path = tier.write(m, memoryview(data))
    [entry] = tier.entries()
    path.write_bytes(path.read_bytes()[:-7])  # cut after it was listed
    with pytest.raises(CorruptSnapshot, match="truncated"):
        tier.load(entry, memoryview(bytearray(m.nbytes)))
    assert tier.entries() == []
    assert (tmp_path / f"{path.name}{CORRUPT_SUFFIX}").exists()


def test_partial_and_garbage_files_are_quarantined_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=5)
    m, data = shard(2)
    good = tier.write(m, memoryview(data))
    m4, data4 = shard(4)
    truncated = tier.write(m4, memoryview(data4))
    truncated.write_bytes(truncated.read_bytes()[:-3])
    (tmp_path / "step-000000000006.rank-00000.safetensors").write_bytes(b"garbage")
    (tmp_path / ".step-000000000008.rank-00000.safetensors.tmp99").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING):
        entries = tier.entries()
    assert [e.path for e in entries] == [good]
    assert "is shorter than" not in caplog.text
    assert f"renamed to {truncated.name}{CORRUPT_SUFFIX}" in caplog.text
    assert sorted(p.name for p in tmp_path.glob(f"*{CORRUPT_SUFFIX}")) == [
        f"{truncated.name}{CORRUPT_SUFFIX}",
        f"step-000000000006.rank-00000.safetensors{CORRUPT_SUFFIX}",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert [e.path for e in tier.entries()] == [good]
    assert caplog.text == ""  # once aside, never looked at again
    tier.clean_temporaries()
    assert not list(tmp_path.glob(".step-*"))


def test_prune_keeps_newest_and_drops_rolled_back_future(tmp_path: Path) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2)
    other = PersistTier(tmp_path, rank=1, keep=1)
    for s in (1, 2, 3, 9):
        m, d = shard(s)
        tier.write(m, memoryview(d))
    m, d = shard(9, rank=1)
    other.write(m, memoryview(d))
    tier.prune(head=3)
    assert [e.manifest.step for e in tier.entries()] == [2, 3]
    assert [e.manifest.step for e in other.entries()] == [9]  # other ranks untouched


def test_full_disk_is_a_clear_error_and_leaves_nothing(tiny_tmpfs: Path) -> None:
    tier = PersistTier(tiny_tmpfs, rank=0, keep=1)
    m, _ = shard(1)
    big = Manifest(
        step=1,
        generation=0,
        rank=0,
        world_size=1,
        nbytes=4 << 20,
        tensors=(TensorEntry("x", "uint8", (4 << 20,), 0, 4 << 20),),
        wall_time=0.0,
    )
    with pytest.raises(CapacityError, match="checkpoint step-000000000001"):
        tier.write(big, memoryview(bytearray(4 << 20)))
    assert list(tiny_tmpfs.iterdir()) == []
    del m


def test_rank_mismatch_and_bad_keep(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        PersistTier(tmp_path, rank=0, keep=0)
    m, d = shard(1, rank=1)
    with pytest.raises(ValueError, match="rank 1"):
        PersistTier(tmp_path, rank=0, keep=1).write(m, memoryview(d))


def test_each_job_keeps_its_files_apart_and_another_jobs_are_skipped_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    theirs = PersistTier(tmp_path, rank=0, keep=5, job="old-run")
    for step in (5, 10):
        m, d = shard(step)
        assert theirs.write(m, memoryview(d)).parent == tmp_path / "old-run"
    ours = PersistTier(tmp_path, rank=0, keep=1, job="new-run")
    m, d = shard(3)
    mine = ours.write(m, memoryview(d))
    assert mine == tmp_path / "new-run" / "step-000000000003.rank-00000.safetensors"
    with caplog.at_level(logging.WARNING):
        assert [e.path for e in ours.entries()] == [mine]
        ours.entries()  # said once, not at every listing
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "not restoring 2 checkpoint file(s) of another job" in lines[0]
    assert "(this job is 'new-run')" in lines[0]
    assert "old-run/step-000000000005.rank-00000.safetensors" in lines[0]
    assert [e.job for e in theirs.entries()] == ["old-run", "old-run"]
    # The same step of another job is a file of its own; pruning never touches theirs.
    for step in (5, 10):
        m, d = shard(step, seed=7)
        ours.write(m, memoryview(d))
    ours.prune(head=10)
    assert [e.manifest.step for e in ours.entries()] == [10]
    assert [e.manifest.step for e in theirs.entries()] == [5, 10]
    buf = bytearray(m.nbytes)
    theirs.load(theirs.entries()[-1], memoryview(buf))
    assert buf == shard(10)[1]  # theirs, not ours


def test_files_without_a_job_are_accepted_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = PersistTier(tmp_path, rank=0, keep=2)  # the layout before job identities
    m, d = shard(7)
    path = legacy.write(m, memoryview(d))
    assert path.parent == tmp_path and b"supervise.job" not in path.read_bytes()
    tier = PersistTier(tmp_path, rank=0, keep=2, job="some-job")
    with caplog.at_level(logging.WARNING):
        [entry] = tier.entries()
    assert entry.job is None and entry.manifest == m
    assert "accepting 1 checkpoint file(s) without a job identity" in caplog.text
    buf = bytearray(m.nbytes)
    tier.load(entry, memoryview(buf))
    assert buf == d
    for step in (8, 9):  # the job goes on: its own files, the old ones pruned past keep
        m, d = shard(step)
        tier.write(m, memoryview(d))
    tier.prune(head=9)
    assert [e.path.parent.name for e in tier.entries()] == ["some-job", "some-job"]
    assert not path.exists()


def test_bad_job_names_are_refused_in_one_line(tmp_path: Path) -> None:
    for bad in ("", "a/b", "-x", "x" * 129, "a b"):
        with pytest.raises(ValueError, match=r"job .*: use 1-128 letters"):
            PersistTier(tmp_path, rank=0, keep=1, job=bad)
    a = job_fingerprint(["python", "train.py"], 2)
    assert a == job_fingerprint(["python", "train.py"], 2)
    assert a != job_fingerprint(["python", "train.py"], 4)
    assert a != job_fingerprint(["python", "other.py"], 2)
    PersistTier(tmp_path, rank=0, keep=1, job=a)  # a fingerprint is a valid job name


def test_finished_job_is_not_resumed_unless_asked(tmp_path: Path) -> None:
    tier = PersistTier(tmp_path / "ckpt", rank=0, keep=2, job="j1")
    other = PersistTier(tmp_path / "ckpt", rank=0, keep=2, job="j2")
    assert tier.mark_finished() is None  # nothing persisted, no directory: no marker
    check_resumable([tier], resume_finished=False, hint="h")
    m, d = shard(3)
    tier.write(m, memoryview(d))
    marker = tier.mark_finished()
    assert marker == tmp_path / "ckpt" / "j1" / "finished.rank-00000.json"
    assert tier.finished() and not other.finished()
    with pytest.raises(FinishedJob, match=r"job 'j1' already finished in .*; pass --resume"):
        check_resumable([tier], resume_finished=False, hint="pass --resume")
    check_resumable([other], resume_finished=False, hint="h")  # another job: not its marker
    assert tier.finished()  # refusing changes nothing
    check_resumable([tier], resume_finished=True, hint="h")
    assert not tier.finished()  # it runs again: finished once more only at its next finish
    assert [e.manifest.step for e in tier.entries()] == [3]


def test_marker_without_checkpoints_left_is_dropped(tmp_path: Path) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2, job="j1")
    tier.path.mkdir()
    assert tier.mark_finished() is not None
    check_resumable([tier], resume_finished=False, hint="h")  # nothing to resume
    assert not tier.finished()
