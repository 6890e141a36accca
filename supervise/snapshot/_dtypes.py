"""Element types a snapshot may hold: torch-free names, sizes and safetensors codes."""

from __future__ import annotations

from typing import Final

# name -> (bytes per element, safetensors dtype code). Names follow torch's (without "torch.").
DTYPES: Final[dict[str, tuple[int, str]]] = {
    "float64": (8, "F64"),
    "float32": (4, "F32"),
    "float16": (2, "F16"),
    "bfloat16": (2, "BF16"),
    "float8_e4m3fn": (1, "F8_E4M3"),
    "float8_e5m2": (1, "F8_E5M2"),
    "complex64": (8, "C64"),
    "int64": (8, "I64"),
    "int32": (4, "I32"),
    "int16": (2, "I16"),
    "int8": (1, "I8"),
    "uint64": (8, "U64"),
    "uint32": (4, "U32"),
    "uint16": (2, "U16"),
    "uint8": (1, "U8"),
    "bool": (1, "BOOL"),
}


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name; ValueError names the unsupported type."""
    try:
        return DTYPES[dtype][0]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r}: snapshots hold {', '.join(DTYPES)}"
        ) from None
