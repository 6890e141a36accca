"""Units a policy is written in: memory sizes (bytes, binary units, percentages) and durations.

Both parse exactly (``fractions.Fraction``), so ``"1.5GiB"`` is 1610612736 bytes and ``"250ms"``
is 0.25 seconds, and both reject what they cannot read with a reason a person can act on.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction
from typing import Final

import attrs

__all__ = ["Size", "UnitError", "parse_duration"]


class UnitError(ValueError):
    """A size or duration that cannot be read; ``reason`` says why without repeating the value."""

    def __init__(self, value: object, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"{value!r}: {reason}")

    def __reduce__(self) -> tuple[type[UnitError], tuple[object, str]]:
        return (type(self), (self.value, self.reason))


_SIZE_UNITS: Final = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_ALIASES: Final = {
    "b": "B",
    "byte": "B",
    "bytes": "B",
    **{f"{p}{s}": f"{p.upper()}iB" for p in "kmgt" for s in ("", "b", "ib")},
}
_SIZE_HELP: Final = "sizes are bytes (an integer) or a string like '64GiB', '512 MiB' or '50%'"
_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z%]*)\s*")


def _number_text(value: float) -> str:
    """The shortest decimal text (no exponent, no trailing '.0') that reads back to ``value``."""
    text = format(Decimal(repr(float(value))), "f")
    return text[:-2] if text.endswith(".0") else text


def _percent(value: float | int | None) -> float | None:
    """Store percentages as floats (ints are accepted); anything else is left to validation."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@attrs.frozen(slots=True, repr=False)
class Size:
    """An amount of memory: absolute (``nbytes``) or relative to a total (``percent``).

    Build one with ``Size.parse(64 << 30)``, ``Size.parse("64GiB")`` or ``Size.parse("50%")``;
    ``str(size)`` gives text that parses back to an equal size.
    """

    nbytes: int | None = attrs.field(default=None, kw_only=True)
    percent: float | None = attrs.field(default=None, kw_only=True, converter=_percent)

    def __attrs_post_init__(self) -> None:
        if (self.nbytes is None) == (self.percent is None):
            raise UnitError(
                {"nbytes": self.nbytes, "percent": self.percent},
                "give exactly one of nbytes= or percent=",
            )
        if self.nbytes is not None:
            if isinstance(self.nbytes, bool) or not isinstance(self.nbytes, int):
                raise UnitError(self.nbytes, "nbytes must be an integer")
            if self.nbytes < 0:
                raise UnitError(self.nbytes, "a size must not be negative")
        else:
            p = self.percent
            if isinstance(p, bool) or not isinstance(p, float) or not 0.0 <= p <= 100.0:
                raise UnitError(p, "a percentage must be between 0% and 100%")

    @classmethod
    def parse(cls, value: Size | int | str) -> Size:
        """Read a size: an int (bytes), or a string with B, KiB, MiB, GiB, TiB or %."""
        if isinstance(value, Size):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise UnitError(value, "a size must not be negative")
            return cls(nbytes=value)
        if not isinstance(value, str):
            raise UnitError(value, _SIZE_HELP)
        match = _SIZE_RE.fullmatch(value)
        if match is None:
            raise UnitError(value, _SIZE_HELP)
        number, unit = Fraction(match[1]), match[2] or "B"
        if unit == "%":
            if number > 100:
                raise UnitError(value, "a percentage must be between 0% and 100%")
            return cls(percent=float(number))
        if unit not in _SIZE_UNITS:
            canonical = _SIZE_ALIASES.get(unit.lower())
            hint = f"; did you mean '{canonical}'?" if canonical else ""
            raise UnitError(value, f"unknown unit {unit!r}{hint} (units: B, KiB, MiB, GiB, TiB, %)")
        nbytes = number * _SIZE_UNITS[unit]
        if nbytes.denominator != 1:
            raise UnitError(value, "not a whole number of bytes")
        return cls(nbytes=int(nbytes))

    @property
    def is_relative(self) -> bool:
        """True for a percentage of some total (RAM, the training state), False for bytes."""
        return self.percent is not None

    def resolve(self, total_bytes: int) -> int:
        """Bytes this size stands for, given the total a percentage refers to (floor)."""
        if isinstance(total_bytes, bool) or not isinstance(total_bytes, int) or total_bytes < 0:
            raise ValueError(f"total_bytes must be an integer >= 0, got {total_bytes!r}")
        if self.nbytes is not None:
            return self.nbytes
        assert self.percent is not None
        return total_bytes * Fraction(_number_text(self.percent)) // 100

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{_number_text(self.percent)}%"
        assert self.nbytes is not None
        for unit in ("TiB", "GiB", "MiB", "KiB"):
            scale = _SIZE_UNITS[unit]
            if self.nbytes and self.nbytes % scale == 0:
                return f"{self.nbytes // scale}{unit}"
        return f"{self.nbytes}B"

    def __repr__(self) -> str:
        return f"Size({str(self)!r})"


_DURATION_UNITS: Final[dict[str, Fraction]] = {
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_ALIASES: Final = {
    **dict.fromkeys(("hr", "hrs", "hour", "hours"), "h"),
    **dict.fromkeys(("min", "mins", "minute", "minutes"), "m"),
    **dict.fromkeys(("sec", "secs", "second", "seconds"), "s"),
    **dict.fromkeys(("msec", "msecs", "millisecond", "milliseconds"), "ms"),
}
_DURATION_HELP: Final = (
    "durations are seconds (a number) or a string like '30s', '5m', '1h', '250ms'"
)
_DURATION_PART_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_duration(value: float | str) -> float:
    """Read a duration as float seconds: a number, or "30s", "5m", "1h", "250ms", "1h30m"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise UnitError(value, "a duration must be finite")
        return seconds
    if not isinstance(value, str):
        raise UnitError(value, _DURATION_HELP)
    parts = list(_DURATION_PART_RE.finditer(value))
    if not parts or "".join(p[0] for p in parts) != value:
        raise UnitError(value, _DURATION_HELP)
    if len(parts) == 1 and not parts[0][2]:
        return float(Fraction(parts[0][1]))  # a bare number in a string: seconds
    total, order = Fraction(0), list(_DURATION_UNITS)
    previous = -1
    for part in parts:
        unit = part[2]
        if unit not in _DURATION_UNITS:
            canonical = _DURATION_ALIASES.get(unit.lower())
            hint = f"; did you mean '{canonical}'?" if canonical else ""
            raise UnitError(value, f"unknown unit {unit!r}{hint} (units: h, m, s, ms)")
        position = order.index(unit)
        if position <= previous:
            raise UnitError(value, "units must go from largest to smallest, each once ('1h30m')")
        previous = position
        total += Fraction(part[1]) * _DURATION_UNITS[unit]
    return float(total)
