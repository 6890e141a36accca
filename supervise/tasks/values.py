"""Task values on the wire and in the journal: msgpack, plus bytes and numpy arrays as raw
buffers — never pickle.

Supported: None, bool, int (64-bit), float, str, bytes, list, tuple (kept a tuple), dict with
str or int keys, numpy arrays of plain dtypes and numpy scalars, nested up to 200 levels.
Anything else (a cycle too) is a one-line `UnsupportedValue` naming where it sits
(``result.features[3]: set is not supported``).
"""

from __future__ import annotations

from typing import Any, Final

import msgpack
import numpy as np

_EXT_TUPLE: Final = 1
_EXT_ARRAY: Final = 2
_EXT_SCALAR: Final = 3
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_MAX_DEPTH: Final = 200  # well below msgpack's nesting limit (511) and Python's recursion limit


class UnsupportedValue(TypeError):
    """A value the task codec cannot carry; the message names its path."""


class CorruptValue(ValueError):
    """Bytes that do not decode to a task value."""


def key_path(path: str, key: object) -> str:
    """``path.key`` for an identifier key, ``path[key!r]`` otherwise."""
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


def _array_ext(path: str, arr: np.ndarray[Any, Any], code: int) -> msgpack.ExtType:
    if arr.dtype.hasobject or arr.dtype.fields is not None or arr.dtype.kind not in "biufcmM":
        raise UnsupportedValue(f"{path}: numpy dtype {arr.dtype} is not supported")
    header = msgpack.packb([arr.dtype.str, list(arr.shape)], use_bin_type=True)
    data = np.ascontiguousarray(arr).tobytes()
    return msgpack.ExtType(code, len(header).to_bytes(4, "little") + header + data)


def _int(value: int, path: str, what: str = "int") -> int:
    if not _INT_MIN <= value <= _INT_MAX:
        raise UnsupportedValue(f"{path}: {what} {value} does not fit in 64 bits")
    return int(value)


def _plain(value: Any, path: str, depth: int = 0) -> Any:
    """``value`` as msgpack-ready data (extensions for tuples and arrays), or UnsupportedValue."""
    if value is None or isinstance(value, bool | str | bytes):
        return value
    if isinstance(value, np.generic):
        return _array_ext(path, np.asarray(value), _EXT_SCALAR)
    if isinstance(value, int):
        return _int(value, path)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, np.ndarray):
        return _array_ext(path, value, _EXT_ARRAY)
    if depth >= _MAX_DEPTH and isinstance(value, list | tuple | dict):
        where = path if len(path) <= 60 else f"{path[:60]}..."
        raise UnsupportedValue(f"{where}: nested more than {_MAX_DEPTH} levels deep (a cycle?)")
    depth += 1
    if isinstance(value, list):
        return [_plain(v, f"{path}[{i}]", depth) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        items = [_plain(v, f"{path}[{i}]", depth) for i, v in enumerate(value)]
        return msgpack.ExtType(_EXT_TUPLE, msgpack.packb(items, use_bin_type=True))
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, str | int):
                raise UnsupportedValue(
                    f"{path}: dict key {k!r} ({type(k).__name__}) is not supported "
                    "(keys must be str or int)"
                )
            key = _int(k, path, "dict key") if isinstance(k, int) else k
            out[key] = _plain(v, key_path(path, key), depth)
        return out
    raise UnsupportedValue(f"{path}: {type(value).__name__} is not supported")


def encode(value: Any, path: str = "value") -> bytes:
    """The bytes of ``value``; `UnsupportedValue` names the first thing that cannot go
    (``path`` is the name the message starts with)."""
    out: bytes = msgpack.packb(_plain(value, path), use_bin_type=True)
    return out


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_TUPLE:
        return tuple(_unpack(data))
    if code in (_EXT_ARRAY, _EXT_SCALAR):
        n = int.from_bytes(data[:4], "little")
        dtype, shape = msgpack.unpackb(data[4 : 4 + n], raw=False)
        arr = np.frombuffer(data[4 + n :], dtype=np.dtype(dtype)).reshape(shape).copy()
        return arr[()] if code == _EXT_SCALAR else arr
    raise CorruptValue(f"unknown extension type {code}")


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)


def decode(data: bytes) -> Any:
    """The value ``encode`` wrote; `CorruptValue` (one line) on bytes it did not write."""
    try:
        return _unpack(data)
    except CorruptValue:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise CorruptValue(f"not a task value: {type(e).__name__}: {e}") from None
