"""Manifest: what a shard's data region holds (per-tensor placement and checksum) plus
the step, generation, rank, metrics and opaque extra state of the capture.

Formats: 2 (written now) names its checksum algorithm (``"checksum": "xxh3_64"``); 1 (written
before) names none and means xxhash64. Both are read; any other is refused in one line.

A shard is a manifest plus one contiguous data region of ``manifest.nbytes`` bytes; the pair
is the unit the arena commits, replication ships and the persist tier writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
import msgpack

from supervise.snapshot._dtypes import DTYPES, itemsize
from supervise.snapshot.errors import CorruptSnapshot, UnsupportedFormat
from supervise.snapshot.hashing import DEFAULT_CHECKSUM, Checksum, checksum_kind

#: The manifest format written; READS lists every format this version reads.
FORMAT: Final = 2
READS: Final = (1, 2)


@attrs.frozen(slots=True)
class TensorEntry:
    """One tensor's place in the data region and the checksum of its bytes (the algorithm is
    the manifest's ``checksum``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    digest: int = 0


@attrs.frozen(slots=True)
class Layout:
    """Where each tensor goes in a data region: packed with no gaps, naturally aligned.

    Tensors are ordered by element size (largest first) so that packing them back to back
    keeps every tensor aligned to its element size without padding; the persist tier's
    safetensors files need exactly that (no holes between tensors).
    """

    entries: tuple[TensorEntry, ...]
    nbytes: int

    @classmethod
    def plan(cls, specs: Iterable[tuple[str, str, tuple[int, ...]]]) -> Layout:
        """Place ``(name, dtype, shape)`` tensors; raises ValueError on a bad or repeated name."""
        items = list(specs)
        seen: set[str] = set()
        for name, dtype, shape in items:
            if not name or name in seen:
                raise ValueError(f"tensor name {name!r} is empty or repeated")
            seen.add(name)
            itemsize(dtype)
            if any((not isinstance(d, int)) or d < 0 for d in shape):
                raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
        order = sorted(range(len(items)), key=lambda i: -DTYPES[items[i][1]][0])
        entries = []
        offset = 0
        for i in order:
            name, dtype, shape = items[i]
            nbytes = math.prod(shape) * DTYPES[dtype][0]
            entries.append(TensorEntry(name, dtype, tuple(shape), offset, nbytes))
            offset += nbytes
        return cls(tuple(entries), offset)

    def key(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """What must stay equal for two captures to share this layout."""
        return tuple((e.name, e.dtype, e.shape) for e in self.entries)


@attrs.frozen(slots=True)
class Manifest:
    """Everything needed to interpret, verify and restore one shard's data region."""

    step: int
    generation: int
    rank: int
    world_size: int
    nbytes: int
    tensors: tuple[TensorEntry, ...]
    wall_time: float
    metrics: Mapping[str, float] = attrs.field(factory=dict)
    extra: bytes = b""
    aliases: Mapping[str, str] = attrs.field(factory=dict)
    checksum: Checksum = DEFAULT_CHECKSUM

    @property
    def version(self) -> int:
        """A version is the training step it captured: every rank agrees without talking."""
        return self.step

    def to_bytes(self) -> bytes:
        """Msgpack encoding (the wire and on-disk form)."""
        out: bytes = msgpack.packb(
            {
                "format": FORMAT,
                "version": self.step,
                "step": self.step,
                "generation": self.generation,
                "rank": self.rank,
                "world_size": self.world_size,
                "nbytes": self.nbytes,
                "wall_time": self.wall_time,
                "metrics": dict(self.metrics),
                "extra": self.extra,
                "aliases": dict(self.aliases),
                "checksum": self.checksum.value,
                "tensors": [
                    [t.name, t.dtype, list(t.shape), t.offset, t.nbytes, t.digest]
                    for t in self.tensors
                ],
            },
            use_bin_type=True,
        )
        return out

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Manifest:
        """Decode and validate; any problem is a one-line CorruptSnapshot."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:
            raise CorruptSnapshot(f"manifest is not valid msgpack: {exc}") from None
        if not isinstance(raw, dict):
            raise CorruptSnapshot("manifest is not a map")
        fmt = raw.get("format")
        if isinstance(fmt, bool) or fmt not in READS:
            reads = " and ".join(str(f) for f in READS)
            raise UnsupportedFormat(
                f"manifest format {fmt!r} is not one this version reads ({reads})"
            )
        try:
            manifest = _from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptSnapshot(f"manifest is malformed: {exc}") from None
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Check internal consistency: sizes, bounds, unique names, aliases; CorruptSnapshot."""
        names: set[str] = set()
        for t in self.tensors:
            if t.name in names:
                raise CorruptSnapshot(f"manifest: tensor {t.name!r} appears twice")
            names.add(t.name)
            if t.dtype not in DTYPES:
                raise CorruptSnapshot(f"manifest: tensor {t.name!r} has unknown dtype {t.dtype!r}")
            if any(d < 0 for d in t.shape):
                raise CorruptSnapshot(f"manifest: tensor {t.name!r} has a negative dimension")
            if t.nbytes != math.prod(t.shape) * DTYPES[t.dtype][0]:
                raise CorruptSnapshot(f"manifest: tensor {t.name!r} size does not match its shape")
            if t.offset < 0 or t.offset + t.nbytes > self.nbytes:
                raise CorruptSnapshot(f"manifest: tensor {t.name!r} lies outside the data region")
            if t.offset % DTYPES[t.dtype][0]:
                raise CorruptSnapshot(f"manifest: tensor {t.name!r} is misaligned")
        for alias, target in self.aliases.items():
            if alias in names or target not in names:
                raise CorruptSnapshot(f"manifest: alias {alias!r} -> {target!r} is invalid")
        if self.step < 0 or self.rank < 0 or self.world_size < 1 or self.rank >= self.world_size:
            raise CorruptSnapshot(
                f"manifest: step {self.step}, rank {self.rank}, world size {self.world_size}"
            )


def _from_dict(raw: dict[str, Any]) -> Manifest:
    checksum = Checksum.XXH64 if raw["format"] == 1 else checksum_kind(raw["checksum"])
    if raw["version"] != raw["step"]:
        raise ValueError("version and step differ")
    tensors = tuple(
        TensorEntry(
            _typed(name, str),
            _typed(dtype, str),
            tuple(_typed(d, int) for d in shape),
            _typed(offset, int),
            _typed(nbytes, int),
            _typed(checksum_value, int),
        )
        for name, dtype, shape, offset, nbytes, checksum_value in raw["tensors"]
    )
    metrics = {_typed(k, str): float(_typed(v, (int, float))) for k, v in raw["metrics"].items()}
    aliases = {_typed(k, str): _typed(v, str) for k, v in raw["aliases"].items()}
    return Manifest(
        step=_typed(raw["step"], int),
        generation=_typed(raw["generation"], int),
        rank=_typed(raw["rank"], int),
        world_size=_typed(raw["world_size"], int),
        nbytes=_typed(raw["nbytes"], int),
        tensors=tensors,
        wall_time=float(_typed(raw["wall_time"], (int, float))),
        metrics=metrics,
        extra=_typed(raw["extra"], bytes),
        aliases=aliases,
        checksum=checksum,
    )


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"unexpected value {value!r}")
    return value
