"""A TOML writer for the policy's plain form (tables of strings, numbers, booleans, arrays).

The policy is a shallow, known shape, so a small writer beats a dependency; its output is
read back with `tomllib` in the tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["dumps", "value"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(f"\\u{ord(ch):04X}" if ord(ch) < 0xD800 else f"\\u{0xFFFD:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def key(name: str) -> str:
    """A key as written in TOML: bare when it can be, quoted otherwise."""
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def value(obj: Any) -> str:
    """One value in TOML syntax; anything TOML cannot hold is written as its Python repr."""
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return repr(obj)
    if isinstance(obj, str):
        return _string(obj)
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{key(str(k))} = {value(v)}" for k, v in obj.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(obj, Sequence) and not isinstance(obj, bytes | bytearray):
        return "[" + ", ".join(value(v) for v in obj) + "]"
    return repr(obj)


def dumps(document: Mapping[str, Mapping[str, Any]], *, header: Sequence[str] = ()) -> str:
    """Write tables of values (one nesting level of sub-tables) as a TOML document."""
    lines = [f"# {h}" for h in header]
    for name, table in document.items():
        _table(lines, [name], table)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    if lines:
        lines.append("")
    lines.append("[" + ".".join(key(p) for p in path) + "]")
    subtables = []
    for name, item in table.items():
        if isinstance(item, Mapping):
            subtables.append((name, item))
        else:
            lines.append(f"{key(name)} = {value(item)}")
    for name, item in subtables:
        _table(lines, [*path, name], item)
