"""Non-tensor training state (optimizer hyperparameters, RNG states, samplers' state_dicts) as
msgpack, with the tensors inside pulled out into the arena and replaced by named references.

No pickling: only plain data is accepted (None, bool, int, float, str, bytes, list, tuple,
dict, numpy arrays and scalars, tensors); anything else is a one-line error naming its path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import msgpack
import numpy as np
import torch

from supervise.snapshot.errors import SnapshotError

_TUPLE: Final = 1
_TENSOR: Final = 2
_NDARRAY: Final = 3
_DTYPE: Final = 4


@attrs.frozen(slots=True)
class TensorRef:
    """Where a tensor of the tree went: its arena name and the device it lived on."""

    name: str
    device: str


def _key(k: Any, path: str) -> Any:
    if k is None or isinstance(k, bool | int | float | str | bytes):
        return k
    raise SnapshotError(f"{path}: map key {k!r} of type {type(k).__name__} cannot be snapshotted")


def pack(tree: Any, on_tensor: Callable[[str, torch.Tensor], TensorRef], root: str) -> bytes:
    """Encode ``tree``; each tensor is handed to ``on_tensor(path, tensor)`` for the arena."""

    def walk(obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, bool | str | bytes):
            return obj
        if isinstance(obj, int):
            if not -(2**63) <= obj < 2**64:
                raise SnapshotError(f"{path}: integer {obj} does not fit 64 bits")
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, torch.Tensor):
            ref = on_tensor(path, obj)
            return msgpack.ExtType(_TENSOR, msgpack.packb([ref.name, ref.device]))
        if isinstance(obj, Mapping):
            return {
                _key(k, path): walk(v, f"{path}/{k}" if path else str(k)) for k, v in obj.items()
            }
        if isinstance(obj, tuple):
            items = [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(obj)]
            return msgpack.ExtType(_TUPLE, msgpack.packb(items, use_bin_type=True))
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(obj)]
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise SnapshotError(f"{path}: numpy arrays of objects cannot be snapshotted")
            arr = np.ascontiguousarray(obj)
            meta = [arr.dtype.str, list(arr.shape), arr.tobytes()]
            return msgpack.ExtType(_NDARRAY, msgpack.packb(meta, use_bin_type=True))
        if isinstance(obj, np.generic):
            return walk(obj.item(), path)
        if isinstance(obj, torch.dtype):
            return msgpack.ExtType(_DTYPE, str(obj).removeprefix("torch.").encode())
        raise SnapshotError(
            f"{path}: a {type(obj).__name__} cannot be snapshotted (allowed: tensors, numbers, "
            "str, bytes, None, lists, tuples, dicts, numpy arrays)"
        )

    out: bytes = msgpack.packb(walk(tree, root), use_bin_type=True)
    return out


def _ext(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(msgpack.unpackb(data, ext_hook=_ext, strict_map_key=False, raw=False))
    if code == _TENSOR:
        name, device = msgpack.unpackb(data, raw=False)
        return TensorRef(name, device)
    if code == _NDARRAY:
        dtype, shape, raw = msgpack.unpackb(data, raw=False)
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    if code == _DTYPE:
        return getattr(torch, data.decode())
    return msgpack.ExtType(code, data)


def unpack(data: bytes) -> Any:
    """Decode a tree; tensors come back as TensorRef."""
    return msgpack.unpackb(data, ext_hook=_ext, strict_map_key=False, raw=False)


def refs(tree: Any) -> list[TensorRef]:
    """Every TensorRef in a decoded tree."""
    out: list[TensorRef] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, TensorRef):
            out.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    walk(tree)
    return out


def resolve(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Replace every TensorRef by ``tensors[ref.name]``."""
    if isinstance(tree, TensorRef):
        return tensors[tree.name]
    if isinstance(tree, dict):
        return {k: resolve(v, tensors) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(resolve(v, tensors) for v in tree)
    if isinstance(tree, list):
        return [resolve(v, tensors) for v in tree]
    return tree
