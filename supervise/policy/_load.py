"""Read a policy from plain data or a TOML file, collecting every problem before giving up.

Each field is converted and validated on its own (so one bad key does not hide the next),
then the cross-field rules whose fields are all valid, then the object is built.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from types import SimpleNamespace
from typing import Any, Final, NoReturn, TypeVar

import attrs

from supervise._validation import InvalidValue, Validator
from supervise.policy import _toml
from supervise.policy._fields import BACKOFF_FIELDS
from supervise.policy._rules import Rule
from supervise.policy.errors import PolicyError, Problem
from supervise.runtime.backoff import Backoff

__all__ = ["MAX_FILE_BYTES", "build", "key_paths", "read_toml"]

T = TypeVar("T")

MAX_FILE_BYTES: Final = 1 << 20
"""A policy is a few hundred bytes; anything past 1 MiB is the wrong file."""


# Tables whose class is not the policy's own: read field by field as `BACKOFF_FIELDS` says.
_FILE_FIELDS: Final[Mapping[type, Mapping[str, tuple[Callable[[Any], Any], Validator]]]] = {
    Backoff: BACKOFF_FIELDS,
}


def _backoff_order(b: Any) -> InvalidValue | None:
    if b.max < b.initial:
        return InvalidValue("max", b.max, f"must be >= initial ({b.initial:g} s)")
    return None


# The runtime's Backoff checks this in __attrs_post_init__; declared here too so that a file
# with several bad backoff keys gets all of them reported.
_FILE_RULES: Final[Mapping[type, tuple[Rule, ...]]] = {
    Backoff: (Rule(("initial", "max"), _backoff_order),),
}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _subtable(field: attrs.Attribute[Any]) -> type | None:
    table = field.metadata.get("table")
    return table if isinstance(table, type) else None


def key_paths(cls: type, path: str = "") -> Iterator[str]:
    """Every key path of an attrs class tree, tables included (``recovery.backoff.max``)."""
    for field in attrs.fields(cls):
        full = _join(path, field.name)
        yield full
        sub = _subtable(field)
        if sub is not None:
            yield from key_paths(sub, full)


def _unknown_key(key: object, known: list[str], path: str, root: type) -> str:
    name = str(key)
    everywhere = list(key_paths(root))
    elsewhere = [p for p in everywhere if p.rpartition(".")[2] == name]
    if elsewhere:
        return f"unknown key here; did you mean '{elsewhere[0]}'?"
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean '{_join(path, close[0])}'?"
    leaves = {
        p.rpartition(".")[2]: p for p in everywhere if not _join(path, "").startswith(p + ".")
    }
    close = difflib.get_close_matches(name.lower(), list(leaves), n=1, cutoff=0.8)
    if close:
        return f"unknown key; did you mean '{leaves[close[0]]}'?"
    return "unknown key; allowed: " + ", ".join(known)


def _convert(cls: type, field: attrs.Attribute[Any], raw: Any) -> Any:
    converter, validator = _FILE_FIELDS.get(cls, {}).get(
        field.name, (field.converter, field.validator)
    )
    value = converter(raw) if callable(converter) else raw
    if validator is not None:
        validator(None, field, value)
    return value


@attrs.frozen(slots=True)
class _Table:
    """One table as read: its values so far (defaults where missing or invalid), the relative
    key paths that could not be read, and the built object (None when anything was wrong)."""

    view: SimpleNamespace
    invalid: frozenset[str]
    built: Any | None


def _blocked(reads: tuple[str, ...], invalid: frozenset[str]) -> bool:
    """Whether a rule reading ``reads`` touches a key (or a table around it) that is invalid."""
    return any(
        r == bad or r.startswith(bad + ".") or bad.startswith(r + ".")
        for r in reads
        for bad in invalid
    )


def _read_table(
    cls: type,
    data: object,
    *,
    default: Any,
    path: str,
    root: type,
    problems: list[Problem],
    source: str | None,
) -> _Table:
    if not isinstance(data, Mapping):
        where = f"[{path}]" if path else "a TOML document"
        problems.append(Problem(path, f"must be a table ({where})", data, source))
        return _Table(SimpleNamespace(), frozenset({""}), None)
    fields = {f.name: f for f in attrs.fields(cls)}
    view = SimpleNamespace(**{name: getattr(default, name) for name in fields})
    values: dict[str, Any] = {}
    invalid: set[str] = set()
    broken = False
    for key, raw in data.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            message = _unknown_key(key, list(fields), path, root)
            problems.append(Problem(_join(path, _toml.key(str(key))), message, raw, source))
            broken = True
            continue
        sub = _subtable(field)
        if sub is not None:
            table = _read_table(
                sub,
                raw,
                default=getattr(default, key),
                path=_join(path, key),
                root=root,
                problems=problems,
                source=source,
            )
            setattr(view, key, table.view)
            if table.built is None:
                invalid.update(_join(key, bad) if bad else key for bad in table.invalid)
                broken = True
            else:
                values[key] = table.built
            continue
        try:
            values[key] = _convert(cls, field, raw)
        except InvalidValue as e:
            shown = raw if e.field == key else e.value  # as written, before unit conversion
            problems.append(Problem(_join(path, e.field), e.allowed, shown, source))
            invalid.add(key)
        else:
            setattr(view, key, values[key])
    rules: tuple[Rule, ...] = _FILE_RULES.get(cls) or tuple(getattr(cls, "_RULES", ()))
    for rule in rules:
        if _blocked(rule.reads, frozenset(invalid)):
            continue
        violation = rule.check(view)
        if violation is not None:
            shown = data.get(violation.field, violation.value)
            problems.append(Problem(_join(path, violation.field), violation.allowed, shown, source))
            broken = True
    built = None
    if not broken and not invalid:
        try:
            built = attrs.evolve(default, **values)
        except InvalidValue as e:
            problems.append(Problem(_join(path, e.field), e.allowed, e.value, source))
    return _Table(view, frozenset(invalid), built)


def build(
    cls: type[T],
    data: object,
    default: T,
    *,
    path: str,
    root: type,
    problems: list[Problem],
    source: str | None,
) -> T | None:
    """``default`` with the keys of ``data`` replaced; None (and ``problems``) when invalid."""
    table = _read_table(
        cls, data, default=default, path=path, root=root, problems=problems, source=source
    )
    built: T | None = table.built
    return built


_SYNTAX_RE: Final = re.compile(
    r"^(?P<msg>.*?)\s*\(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$"
)


def _syntax_problem(error: tomllib.TOMLDecodeError, text: str, source: str) -> Problem:
    message = str(error).splitlines()[0] if str(error) else "syntax error"
    match = _SYNTAX_RE.match(message)
    if match is None:
        return Problem("", f"invalid TOML: {message}", file=source)
    if match["line"] is None:
        return Problem("", f"invalid TOML: {match['msg']} (at the end of the file)", file=source)
    line, column = int(match["line"]), int(match["col"])
    lines = text.splitlines()
    shown = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    if len(shown) > 60:
        shown = shown[:57] + "..."
    detail = f"invalid TOML: {match['msg']} (column {column})"
    return Problem("", f"{detail}: {shown!r}" if shown else detail, file=source, line=line)


def parse_toml(data: bytes, source: str) -> dict[str, Any]:
    """TOML bytes to a dict; raises `PolicyError` for non-UTF-8 bytes or a syntax error."""
    if len(data) > MAX_FILE_BYTES:
        _fail(Problem("", "too large for a policy file (more than 1 MiB)", file=source))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        _fail(
            Problem(
                "", f"not a UTF-8 text file (byte 0x{data[e.start]:02x})", file=source, line=line
            )
        )
    text = text.removeprefix("\ufeff")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        _fail(_syntax_problem(e, text, source))
    except RecursionError:
        _fail(Problem("", "invalid TOML: nested too deeply", file=source))


def _fail(problem: Problem) -> NoReturn:
    raise PolicyError([problem])


def read_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """The parsed TOML at ``path`` and the name to report it under; `PolicyError` otherwise."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        _fail(Problem("", "no such file", file=source))
    except IsADirectoryError:
        _fail(Problem("", "is a directory, not a policy file", file=source))
    except PermissionError:
        _fail(Problem("", "permission denied", file=source))
    except OSError as e:
        _fail(Problem("", f"cannot read: {e.strerror or e}", file=source))
    except ValueError as e:  # a NUL byte in the path
        _fail(Problem("", f"cannot read: {e}", file=source))
    return parse_toml(data, source), source
