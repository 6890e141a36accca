"""Converters and validators for policy fields.

Converters are lenient: what they cannot read comes back wrapped in `Unparsed`, and the
field's validator (which knows the field's name) turns it into an `InvalidValue`. That keeps
every error naming its key, also for values given in Python.
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, cast

import attrs

from supervise._validation import InvalidValue, Validator, instance_of, number, one_of
from supervise.policy.units import Size, UnitError, parse_duration
from supervise.runtime.backoff import Backoff

__all__ = [
    "BACKOFF_FIELDS",
    "Unparsed",
    "boolean",
    "choice",
    "fractions",
    "import_path",
    "integer",
    "metric_name",
    "path_text",
    "policy_backoff",
    "real",
    "seconds",
    "size",
    "to_fractions",
    "to_reset_after",
    "to_seconds",
    "to_size",
]


@attrs.frozen(slots=True)
class Unparsed:
    """A raw value a converter could not read, and why."""

    raw: object
    reason: str


def _reject_unparsed(attr: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, Unparsed):
        raise InvalidValue(attr.name, value.raw, value.reason)


def to_seconds(value: float | str) -> float:
    """Converter: a duration (number or "30s") to float seconds."""
    try:
        return parse_duration(value)
    except UnitError as e:
        return cast(float, Unparsed(value, e.reason))


def to_reset_after(value: float | str | None) -> float | None:
    """Converter for ``backoff.reset_after`` in a file: a duration, where 0 means never (None)."""
    if value is None:
        return None
    seconds = to_seconds(value)
    return None if seconds == 0 else seconds


def to_size(value: Size | int | str) -> Size:
    """Converter: bytes or "64GiB" / "50%" to a `Size`."""
    try:
        return Size.parse(value)
    except UnitError as e:
        return cast(Size, Unparsed(value, e.reason))


def to_fractions(value: Sequence[float]) -> tuple[float, ...]:
    """Converter: numbers to a sorted tuple of floats (left as given unless all are numbers)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return cast(tuple[float, ...], Unparsed(value, "must be an array of numbers"))
    items = tuple(value)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
        return tuple(sorted(float(v) for v in items))
    return items


def to_names(value: Sequence[str]) -> tuple[str, ...]:
    """Converter: an array of strings to a tuple (left as given unless it is an array)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return cast(tuple[str, ...], Unparsed(value, 'must be an array of strings, like ["torch"]'))
    return tuple(value)


def integer(*, ge: int) -> Validator:
    """Validator: an int (not a bool) >= ``ge``."""
    return number(ge=ge, integer=True)


def real(*, ge: float | None = None, lt: float | None = None) -> Validator:
    """Validator: a finite real number within bounds."""
    inner = number(ge=ge, lt=lt)

    def check(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        inner(inst, attr, value)
        if not math.isfinite(value):
            raise InvalidValue(attr.name, value, "must be a finite number")

    return check


def seconds(*, ge: float | None = None, gt: float | None = None) -> Validator:
    """Validator: a finite duration in seconds within bounds (after `to_seconds`)."""
    bound = f" >= {ge:g}" if ge is not None else f" > {gt:g}" if gt is not None else ""
    allowed = f"must be a duration{bound} (seconds, or a string like '30s', '5m', '1h', '250ms')"

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        _reject_unparsed(attr, value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidValue(attr.name, value, allowed)
        if not math.isfinite(value) or (ge is not None and value < ge):
            raise InvalidValue(attr.name, value, allowed)
        if gt is not None and value <= gt:
            raise InvalidValue(attr.name, value, allowed)

    return check


def size(*, nonzero: bool) -> Validator:
    """Validator: a `Size` (after `to_size`); ``nonzero`` rejects 0 bytes and 0%."""

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        _reject_unparsed(attr, value)
        if not isinstance(value, Size):
            raise InvalidValue(attr.name, value, "must be a size like '64GiB' or '50%'")
        if nonzero and (value.nbytes == 0 or value.percent == 0):
            raise InvalidValue(attr.name, str(value), "must be more than 0 (like '64GiB' or '50%')")

    return check


def fractions(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    """Validator: distinct progress fractions, each strictly between 0 and 1."""
    _reject_unparsed(attr, value)
    allowed = "must be a fraction of the run strictly between 0 and 1 (like 0.25)"
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 < item < 1:
            raise InvalidValue(f"{attr.name}[{i}]", item, allowed)
    if len(set(value)) != len(value):
        raise InvalidValue(attr.name, list(value), "must not repeat a fraction")


def choice(*choices: str) -> Validator:
    """Validator: one of a fixed set of strings."""
    return one_of(choices)


def boolean(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    """Validator: true or false."""
    if not isinstance(value, bool):
        raise InvalidValue(attr.name, value, "must be true or false")


def _text(attr: attrs.Attribute[Any], value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidValue(attr.name, value, "must be a string")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidValue(attr.name, value, "must not contain control characters")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidValue(attr.name, value, "must be valid Unicode (no lone surrogates)")
    return value


def metric_name(*, optional: bool) -> Validator:
    """Validator: the name of a metric passed to ``Snapshotter.step(metrics=...)``."""

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        text = _text(attr, value)
        if optional and text == "":
            return
        if text.strip() != text or not text:
            what = '"" (off) or a metric name' if optional else "a metric name like 'loss'"
            raise InvalidValue(attr.name, value, f"must be {what}, without surrounding spaces")

    return check


def path_text(*, optional: bool) -> Validator:
    """Validator: a filesystem path (not checked for existence: it is used on the nodes)."""

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        text = _text(attr, value)
        if not optional and not text.strip():
            raise InvalidValue(attr.name, value, "must be a non-empty path")

    return check


def _dotted(name: str) -> bool:
    parts = name.split(".")
    return all(p.isidentifier() and not keyword.iskeyword(p) for p in parts)


def module_names(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    """Validator: distinct dotted module names like "torch" or "torch.distributed"."""
    _reject_unparsed(attr, value)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _dotted(item):
            raise InvalidValue(f"{attr.name}[{i}]", item, 'must be a module name like "torch"')
    if len(set(value)) != len(value):
        raise InvalidValue(attr.name, list(value), "must not repeat a module")


def import_path(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    """Validator: "" or a callable's import path "package.module:function" (not imported here)."""
    text = _text(attr, value)
    if text == "":
        return
    module, sep, name = text.partition(":")
    if not sep or not _dotted(module) or not _dotted(name):
        raise InvalidValue(
            attr.name, value, 'must be "" (none) or an import path like "package.module:function"'
        )


def _to_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _reset_after(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        seconds(ge=0)(inst, attr, value)  # 0 was turned into None ("never") by the converter


BACKOFF_FIELDS: Final[Mapping[str, tuple[Callable[[Any], Any], Validator]]] = {
    "initial": (to_seconds, seconds(ge=0)),
    "max": (to_seconds, seconds(ge=0)),
    "multiplier": (_to_float, real(ge=1)),
    "jitter": (_to_float, real(ge=0, lt=1)),
    "reset_after": (to_reset_after, _reset_after),
}
"""How a policy reads the runtime's `Backoff`: durations may carry units, ``reset_after = 0``
means never, and every value is finite (a policy must survive its TOML form)."""


_is_backoff = instance_of(Backoff)


def policy_backoff(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    """Validator: a `Backoff` whose every field is what `BACKOFF_FIELDS` accepts in a file."""
    _is_backoff(_inst, attr, value)
    for field in attrs.fields(Backoff):
        convert, check = BACKOFF_FIELDS[field.name]
        try:
            check(None, field, convert(getattr(value, field.name)))
        except InvalidValue as e:
            raise InvalidValue(f"{attr.name}.{e.field}", e.value, e.allowed) from None
