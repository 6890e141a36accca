"""Bit-for-bit comparison of two saved parameter files (torch is imported here only, lazily)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import attrs


@attrs.frozen(slots=True)
class Comparison:
    """How two ``{name: tensor}`` files compare, byte for byte."""

    equal: bool
    tensors: int
    nbytes: int
    digest: str  # sha256 over every tensor's name, dtype, shape and bytes (of the first file)
    differences: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.equal:
            return (
                f"{self.tensors} tensors, {self.nbytes:,} bytes identical"
                f" (sha256 {self.digest[:16]})"
            )
        return "; ".join(self.differences[:5]) + (" ..." if len(self.differences) > 5 else "")


def compare_parameters(result: Path, reference: Path) -> Comparison:
    """Compare every tensor of ``result`` with ``reference``: same names, dtypes, shapes and
    bytes. A NaN compares by its bits, so identical NaNs are equal and nothing is "close"."""
    import torch

    got = torch.load(result, map_location="cpu", weights_only=True)
    want = torch.load(reference, map_location="cpu", weights_only=True)
    differences: list[str] = []
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        differences.append(f"tensor names differ (missing {missing}, extra {extra})")
    digest = hashlib.sha256()
    nbytes = 0
    for name in sorted(set(got) & set(want)):
        a, b = got[name].contiguous(), want[name].contiguous()
        if a.dtype != b.dtype or a.shape != b.shape:
            differences.append(f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
            continue
        raw_a = a.reshape(-1).view(torch.uint8).numpy().tobytes()
        raw_b = b.reshape(-1).view(torch.uint8).numpy().tobytes()
        digest.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        digest.update(raw_a)
        nbytes += len(raw_a)
        if raw_a != raw_b:
            flat_a, flat_b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
            diff = sum(1 for x, y in zip(flat_a, flat_b, strict=True) if x != y)
            differences.append(f"{name}: {diff} of {a.numel()} elements differ")
    return Comparison(not differences, len(got), nbytes, digest.hexdigest(), tuple(differences))
