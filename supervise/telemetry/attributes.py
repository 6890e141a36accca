"""Span attributes from full keys or keyword shorthands, with the contract's values checked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from opentelemetry.util.types import AttributeValue

from supervise.telemetry.config import TelemetryError
from supervise.telemetry.names import SHORT_ATTRIBUTES, Attr, Source, Trigger

_NON_NEGATIVE_INTS: Final = frozenset(
    {
        Attr.NODE_RANK,
        Attr.SNAPSHOT_VERSION,
        Attr.SNAPSHOT_STEP,
        Attr.BYTES,
        Attr.GENERATION,
        Attr.PEER_RANK,
    }
)
_CHOICES: Final[dict[str, frozenset[str]]] = {
    Attr.TRIGGER: frozenset(t.value for t in Trigger),
    Attr.SNAPSHOT_SOURCE: frozenset(s.value for s in Source),
}

Attributes = Mapping[str, AttributeValue]


def attributes(values: Attributes | None = None, /, **short: object) -> dict[str, AttributeValue]:
    """Validated span attributes: full keys from ``values`` plus keyword shorthands.

    ``attributes(snapshot_version=3, snapshot_source="peer")`` gives
    ``{"supervise.snapshot.version": 3, "supervise.snapshot.source": "peer"}``; contract
    attributes are checked (trigger and source from their sets, ranks/steps/bytes >= 0).
    """
    out: dict[str, AttributeValue] = {}
    raw: Mapping[Any, object] = values or {}
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            raise TelemetryError(f"attribute key {key!r}: must be a non-empty string")
        out[key] = _check(key, value)
    for name, short_value in short.items():
        full = SHORT_ATTRIBUTES.get(name)
        if full is None:
            known = ", ".join(sorted(SHORT_ATTRIBUTES))
            raise TelemetryError(
                f"unknown attribute {name!r}: use one of {known}, or pass the full key in a mapping"
            )
        out[full] = _check(full, short_value)
    return out


def _check(key: str, value: object) -> AttributeValue:
    if key in _CHOICES:
        text = str(value) if isinstance(value, str) else None
        if text not in _CHOICES[key]:
            listed = ", ".join(sorted(_CHOICES[key]))
            raise TelemetryError(f"{key} = {value!r}: must be one of {listed}")
        return text
    if key in _NON_NEGATIVE_INTS or key == Attr.ATTEMPT:
        low = 1 if key == Attr.ATTEMPT else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise TelemetryError(f"{key} = {value!r}: must be an integer >= {low}")
        return value
    if isinstance(value, str):
        return str(value)  # plain str, also for StrEnum members
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple) and value:
        kinds = {type(v) for v in value}
        if len(kinds) == 1 and kinds <= {str, bool, int, float}:
            return tuple(value)
    raise TelemetryError(
        f"{key} = {value!r}: must be a str, bool, int, float or a non-empty sequence of one of them"
    )
