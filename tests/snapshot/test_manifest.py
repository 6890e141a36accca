import pytest

from supervise.snapshot import CorruptSnapshot, Layout, Manifest, TensorEntry
from supervise.snapshot.checksum import digests, mismatches


def _manifest(**kw: object) -> Manifest:
    layout = Layout.plan([("a", "bfloat16", (3,)), ("b", "float32", (2, 2)), ("c", "int64", ())])
    base: dict[str, object] = dict(
        step=7,
        generation=1,
        rank=0,
        world_size=2,
        nbytes=layout.nbytes,
        tensors=layout.entries,
        wall_time=1.5,
        metrics={"loss": 0.25},
        extra=b"\x01\x02",
        aliases={"a2": "a"},
    )
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


def test_layout_packs_without_gaps_and_keeps_natural_alignment() -> None:
    layout = Layout.plan(
        [
            ("u8", "uint8", (3,)),
            ("bf", "bfloat16", (5,)),
            ("f", "float32", (3,)),
            ("i64", "int64", (1,)),
            ("b", "bool", (2,)),
        ]
    )
    end = 0
    for e in sorted(layout.entries, key=lambda e: e.offset):
        assert e.offset == end
        assert (
            e.offset % {"uint8": 1, "bool": 1, "bfloat16": 2, "float32": 4, "int64": 8}[e.dtype]
            == 0
        )
        end += e.nbytes
    assert end == layout.nbytes == 3 + 10 + 12 + 8 + 2


def test_layout_rejects_bad_specs() -> None:
    with pytest.raises(ValueError, match="repeated"):
        Layout.plan([("a", "float32", (1,)), ("a", "float32", (1,))])
    with pytest.raises(ValueError, match="unsupported dtype 'complex128'"):
        Layout.plan([("a", "complex128", (1,))])


def test_manifest_round_trip() -> None:
    m = _manifest()
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m
    assert back.version == 7


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x90", "not a map"),
    ],
)
def test_manifest_garbage_is_a_clear_error(bad: bytes, message: str) -> None:
    with pytest.raises(CorruptSnapshot, match=message):
        Manifest.from_bytes(bad)


def test_manifest_inconsistencies_are_detected() -> None:
    m = _manifest()
    t = m.tensors[0]
    with pytest.raises(CorruptSnapshot, match="outside the data region"):
        Manifest.from_bytes(_manifest(nbytes=4).to_bytes())
    wrong = TensorEntry(t.name, t.dtype, (99,), t.offset, t.nbytes)
    with pytest.raises(CorruptSnapshot, match="does not match its shape"):
        Manifest.from_bytes(_manifest(tensors=(wrong, *m.tensors[1:])).to_bytes())
    with pytest.raises(CorruptSnapshot, match="alias"):
        Manifest.from_bytes(_manifest(aliases={"x": "nope"}).to_bytes())
    with pytest.raises(CorruptSnapshot, match="rank 2"):
        Manifest.from_bytes(_manifest(rank=2).to_bytes())


def test_checksums_detect_a_flipped_byte() -> None:
    m = _manifest()
    data = bytearray(range(m.nbytes))
    sums = digests(m.tensors, memoryview(data), threads=2)
    m = _manifest(
        tensors=tuple(
            TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes, h)
            for e, h in zip(m.tensors, sums, strict=True)
        )
    )
    assert mismatches(m, memoryview(data)) == []
    victim = m.tensors[1]
    data[victim.offset] ^= 0x01
    assert mismatches(m, memoryview(data), threads=2) == [victim.name]
