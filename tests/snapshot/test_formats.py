"""Checksum formats: shards written before XXH3 (manifest and arena format 1, xxhash64) are
read and verified; new ones (format 2, XXH3-64) round-trip; corruption is caught in both; a
format this version does not know is refused in one line and left in place.

The ``data/format1.*`` files were written by the code before this change (commit 98c819a):
a persisted shard of job ``format1`` and an arena with that shard committed in slot 1.
"""

import base64
import json
import logging
import shutil
import struct
from pathlib import Path

import msgpack
import pytest
import xxhash

from supervise.snapshot import (
    Arena,
    Checksum,
    CorruptSnapshot,
    Layout,
    Manifest,
    PersistTier,
    TensorEntry,
    UnsupportedFormat,
)
from supervise.snapshot.checksum import digests, mismatches
from supervise.snapshot.persist import CORRUPT_SUFFIX

DATA = Path(__file__).parent / "data"
OLD_FILE = "format1.step-000000000005.rank-00000.safetensors"
FILE = "step-000000000005.rank-00000.safetensors"
OLD_BYTES = bytes((i * 7 + 3) % 251 for i in range(74))  # what the format-1 shard holds


def _old_tier(tmp_path: Path) -> PersistTier:
    (tmp_path / "format1").mkdir()
    shutil.copy(DATA / OLD_FILE, tmp_path / "format1" / FILE)
    return PersistTier(tmp_path, rank=0, keep=2, job="format1")


def test_a_format1_persisted_file_is_read_and_verified_with_xxhash64(tmp_path: Path) -> None:
    tier = _old_tier(tmp_path)
    [entry] = tier.entries()
    m = entry.manifest
    assert m.checksum is Checksum.XXH64 and m.step == 5
    assert m.tensors[0].digest == xxhash.xxh64_intdigest(
        OLD_BYTES[m.tensors[0].offset : m.tensors[0].offset + m.tensors[0].nbytes]
    )
    into = bytearray(m.nbytes)
    tier.load(entry, memoryview(into))
    assert bytes(into) == OLD_BYTES


def test_a_corrupted_format1_file_is_detected_and_quarantined(tmp_path: Path) -> None:
    tier = _old_tier(tmp_path)
    [entry] = tier.entries()
    raw = bytearray(entry.path.read_bytes())
    raw[entry.data_offset + 1] ^= 0x10
    entry.path.write_bytes(raw)
    with pytest.raises(CorruptSnapshot, match="checksum mismatch"):
        tier.load(entry, memoryview(bytearray(entry.manifest.nbytes)))
    assert entry.path.with_name(entry.path.name + CORRUPT_SUFFIX).exists()


def test_a_format1_arena_is_adopted_and_keeps_its_slot_checksum(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    shutil.copy(DATA / "format1.arena", path)
    arena = Arena.open(path)
    try:
        assert arena.format == 1
        [c] = arena.committed()
        assert c.slot == 1 and c.seq == 3
        m = Manifest.from_bytes(c.manifest)
        assert m.checksum is Checksum.XXH64
        data = arena.data(1, m.nbytes)
        assert bytes(data) == OLD_BYTES and mismatches(m, data) == []
        data[0] ^= 0x01  # the checksum still catches a flipped byte
        assert mismatches(m, data) == [t.name for t in m.tensors if t.offset == 0]
        data[0] ^= 0x01
        # a new capture committed into the old arena: format-2 manifest, format-1 slot record
        new = _new_manifest(7, bytes(arena.data(0, m.nbytes)))
        arena.commit(0, new.to_bytes(), seq=4)
    finally:
        arena.close()
    again = Arena.open(path)
    try:
        got = {c.slot: Manifest.from_bytes(c.manifest) for c in again.committed()}
        assert got[0].checksum is Checksum.XXH3_64 and got[1].checksum is Checksum.XXH64
    finally:
        again.close()


def _new_manifest(step: int, data: bytes) -> Manifest:
    layout = Layout.plan([("w", "float32", (4, 3)), ("h", "bfloat16", (5,)), ("n", "int64", (2,))])
    sums = digests(layout.entries, memoryview(data))
    return Manifest(
        step=step,
        generation=0,
        rank=0,
        world_size=1,
        nbytes=layout.nbytes,
        tensors=tuple(
            TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes, h)
            for e, h in zip(layout.entries, sums, strict=True)
        ),
        wall_time=1.0,
    )


def test_new_shards_use_xxh3_and_round_trip_through_disk_and_arena(tmp_path: Path) -> None:
    data = bytes(range(74))
    m = _new_manifest(9, data)
    raw = msgpack.unpackb(m.to_bytes())
    assert raw["format"] == 2 and raw["checksum"] == "xxh3_64"
    t = m.tensors[0]
    assert t.digest == xxhash.xxh3_64_intdigest(data[t.offset : t.offset + t.nbytes])
    assert Manifest.from_bytes(m.to_bytes()) == m
    tier = PersistTier(tmp_path / "disk", rank=0, keep=2, job="new")
    tier.write(m, memoryview(data))
    [entry] = tier.entries()
    into = bytearray(m.nbytes)
    tier.load(entry, memoryview(into))
    assert bytes(into) == data and entry.manifest.checksum is Checksum.XXH3_64
    arena = Arena.create(tmp_path / "arena", data_capacity=4096, n_slots=2)
    try:
        assert arena.format == 2
        arena.data(0, m.nbytes)[:] = data
        arena.commit(0, m.to_bytes(), seq=1)
        [c] = arena.committed()
        assert Manifest.from_bytes(c.manifest) == m
        (mhash,) = struct.unpack_from("<Q", arena.buffer, 4096 + 24)
        assert mhash == xxhash.xxh3_64_intdigest(c.manifest)
        view = arena.data(0, m.nbytes)
        view[5] ^= 0xFF
        assert mismatches(m, view) != []
    finally:
        arena.close()


def _unknown_format(manifest: bytes) -> bytes:
    raw = msgpack.unpackb(manifest)
    raw["format"] = 3
    out: bytes = msgpack.packb(raw, use_bin_type=True)
    return out


def test_an_unknown_manifest_format_is_refused_in_one_line() -> None:
    with pytest.raises(UnsupportedFormat, match=r"^manifest format 3 is not one this version"):
        Manifest.from_bytes(_unknown_format(_new_manifest(1, bytes(74)).to_bytes()))
    raw = msgpack.unpackb(_new_manifest(1, bytes(74)).to_bytes())
    raw["checksum"] = "md5"
    with pytest.raises(CorruptSnapshot, match=r"unknown checksum 'md5' \(known: xxh64, xxh3_64"):
        Manifest.from_bytes(msgpack.packb(raw, use_bin_type=True))


def test_another_versions_file_is_skipped_in_one_line_and_left_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tier = PersistTier(tmp_path, rank=0, keep=2, job="j")
    m = _new_manifest(4, bytes(74))
    path = tier.write(m, memoryview(bytes(74)))
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n].decode())
    meta = h["__metadata__"]
    old = base64.b64decode(meta["supervise.manifest"])
    meta["supervise.manifest"] = base64.b64encode(_unknown_format(old)).decode()
    body = json.dumps(h).encode()
    body += b" " * (-(8 + len(body)) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with caplog.at_level(logging.WARNING):
        assert tier.entries() == [] and tier.entries() == []
    lines = [r.getMessage() for r in caplog.records if path.name in r.getMessage()]
    assert len(lines) == 1 and "manifest format 3 is not one this version reads" in lines[0]
    assert path.exists()  # not quarantined: a newer supervise may still read it


def test_an_unknown_arena_format_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "arena"
    Arena.create(path, data_capacity=4096, n_slots=1).close()
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 9))
    with pytest.raises(UnsupportedFormat, match=r"arena format 9 is not one this version reads"):
        Arena.open(path)


def test_an_agent_adopts_a_format1_arena_and_leaves_an_unknown_one_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from snaphelp import make_service

    old = tmp_path / "supervise-n7-r00000-0000.arena"
    shutil.copy(DATA / "format1.arena", old)
    future = tmp_path / "supervise-n7-r00001-0000.arena"
    Arena.create(future, data_capacity=4096, n_slots=1, rank=1).close()
    with open(future, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 9))
    with caplog.at_level(logging.WARNING):
        svc = make_service(tmp_path, node="n7")
    try:
        assert [v.step for v in svc.versions(0)] == [5]
        with svc.shard(0, 5) as sh:
            assert bytes(sh.data) == OLD_BYTES
            assert sh.manifest.checksum is Checksum.XXH64
            assert mismatches(sh.manifest, sh.data) == []
        assert svc.versions(1) == []
        assert f"not adopting {future}" in caplog.text and "arena format 9" in caplog.text
        assert future.exists()  # another version's arena: neither adopted nor removed
    finally:
        svc.close()
