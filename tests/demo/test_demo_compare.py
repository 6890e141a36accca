"""Bit-for-bit comparison of saved parameters."""

from __future__ import annotations

from pathlib import Path

import torch

from supervise._demo.compare import compare_parameters


def save(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    torch.save(tensors, path)
    return path


def test_identical_parameters_are_equal_even_with_nan(tmp_path: Path) -> None:
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    w[0, 0] = float("nan")
    a = save(tmp_path / "a.pt", {"w": w, "b": torch.zeros(4), "s": torch.tensor(1.5)})
    b = save(tmp_path / "b.pt", {"w": w.clone(), "b": torch.zeros(4), "s": torch.tensor(1.5)})
    cmp = compare_parameters(a, b)
    assert cmp.equal and cmp.tensors == 3 and cmp.nbytes == (12 + 4 + 1) * 4
    assert "3 tensors, 68 bytes identical" in cmp.describe()


def test_one_flipped_bit_is_a_difference(tmp_path: Path) -> None:
    w = torch.randn(64)
    flipped = w.clone()
    flipped.view(torch.int32)[7] ^= 1  # the last mantissa bit: "close" is not equal
    cmp = compare_parameters(
        save(tmp_path / "a.pt", {"w": w}), save(tmp_path / "b.pt", {"w": flipped})
    )
    assert not cmp.equal
    assert cmp.differences == ("w: 1 of 64 elements differ",)


def test_names_dtypes_and_shapes_must_match(tmp_path: Path) -> None:
    a = save(tmp_path / "a.pt", {"w": torch.zeros(4), "x": torch.zeros(2)})
    b = save(tmp_path / "b.pt", {"w": torch.zeros(4, dtype=torch.float64), "y": torch.zeros(2)})
    cmp = compare_parameters(a, b)
    assert not cmp.equal
    assert any("tensor names differ" in d for d in cmp.differences)
    assert any(d.startswith("w: torch.float32(4,) vs torch.float64(4,)") for d in cmp.differences)
