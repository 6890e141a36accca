"""Backoff between restarts: exponential growth to a cap, optional jitter, reset when stable."""

from __future__ import annotations

import math

import attrs

from supervise._validation import InvalidValue, number


def _reset_after(_inst: Backoff, attr: attrs.Attribute[float | None], value: float | None) -> None:
    if value is not None:
        number(gt=0)(_inst, attr, value)


@attrs.frozen(slots=True)
class Backoff:
    """Delay before the n-th consecutive restart: ``min(max, initial * multiplier**(n-1))``,
    scaled by ``1 ± jitter``; the count resets once a child ran ``reset_after`` seconds.
    """

    initial: float = attrs.field(default=0.1, validator=number(ge=0))
    max: float = attrs.field(default=30.0, validator=number(ge=0))
    multiplier: float = attrs.field(default=2.0, validator=number(ge=1))
    jitter: float = attrs.field(default=0.0, validator=number(ge=0, lt=1))
    reset_after: float | None = attrs.field(default=None, validator=_reset_after)

    def __attrs_post_init__(self) -> None:
        if self.max < self.initial:
            raise InvalidValue("max", self.max, f"must be >= initial ({self.initial:g})")

    def delay(self, n: int, u: float = 0.5) -> float:
        """Seconds to wait before the n-th consecutive restart (n >= 1).

        ``u`` is a uniform sample in [0, 1): 0.5 gives the un-jittered delay, so the function
        stays pure and callers supply randomness.
        """
        if n < 1:
            return 0.0
        if self.initial == 0 or self.multiplier == 1:
            base = self.initial
        elif (n - 1) * math.log(self.multiplier) >= math.log(self.max / self.initial):
            base = self.max  # at or past the cap: exact, whatever float powers would round to
        else:
            try:  # float power: an int multiplier must not build a huge int for a large n
                base = self.initial * float(self.multiplier) ** (n - 1)
            except OverflowError:  # past any finite cap (also when max is inf)
                base = math.inf
        base = min(base, self.max)
        return base * (1.0 + self.jitter * (2.0 * u - 1.0))

    def should_reset(self, ran_for: float) -> bool:
        """Whether a child that ran ``ran_for`` seconds has earned a fresh restart count."""
        return self.reset_after is not None and ran_for >= self.reset_after
