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


def test_flipped_byte_on_disk_is_detected(tmp_path: Path) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2)
    m, data = shard(1)
    path = tier.write(m, memoryview(data))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(raw)
    [entry] = tier.entries()
    with pytest.raises(CorruptSnapshot, match="checksum mismatch"):
        tier.load(entry, memoryview(bytearray(m.nbytes)))


def test_partial_and_garbage_files_are_skipped_with_a_warning(
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
    assert "skipping unreadable checkpoint" in caplog.text
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
