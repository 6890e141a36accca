"""Field validation shared by specs and policies: one exception type that knows its field.

Policies turn `InvalidValue.field` into a full key path (`recovery.backoff.max`), so every
validator raises it instead of a bare ValueError.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import attrs


class InvalidValue(ValueError):
    """A field got a value outside what it allows."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field} = {value!r}: {allowed}")


Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

E = TypeVar("E", bound=enum.Enum)


def number(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    integer: bool = False,
) -> Validator:
    """Validator: a real number (bool excluded) within the given bounds."""
    parts = []
    if ge is not None:
        parts.append(f">= {ge:g}")
    if gt is not None:
        parts.append(f"> {gt:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    if lt is not None:
        parts.append(f"< {lt:g}")
    kind = "an integer" if integer else "a number"
    allowed = kind + (" " + " and ".join(parts) if parts else "")

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or value != value:  # noqa: PLR0124 (NaN)
            raise InvalidValue(attr.name, value, f"must be {allowed}")
        if (
            (ge is not None and value < ge)
            or (gt is not None and value <= gt)
            or (le is not None and value > le)
            or (lt is not None and value >= lt)
        ):
            raise InvalidValue(attr.name, value, f"must be {allowed}")

    return check


def one_of(choices: Collection[str]) -> Validator:
    """Validator: one of a fixed set of strings."""
    listed = ", ".join(repr(c) for c in choices)

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise InvalidValue(attr.name, value, f"must be one of {listed}")

    return check


def instance_of(cls: type, *, optional: bool = False) -> Validator:
    """Validator: an instance of ``cls`` (or None when ``optional``)."""
    allowed = f"must be a {cls.__name__}" + (" or None" if optional else "")

    def check(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, cls) and not (optional and value is None):
            raise InvalidValue(attr.name, value, allowed)

    return check


def enum_value(kind: type[E], field: str, value: Any) -> E:
    """A member of ``kind`` from itself or its value (for converters); `InvalidValue` naming
    ``field`` otherwise."""
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise InvalidValue(field, value, f"must be one of {allowed}") from None
