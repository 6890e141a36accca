"""Cross-field rules: checks that read several fields, declared with the fields they read.

Declaring what a rule reads lets the file loader evaluate every rule whose fields are valid
and skip the others, so a file's problems are all reported in one go.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import attrs

from supervise._validation import InvalidValue

__all__ = ["Rule", "enforce", "violations"]


@attrs.frozen(slots=True)
class Rule:
    """``check(obj)`` returns the problem, or None when the rule holds."""

    reads: tuple[str, ...]
    check: Callable[[Any], InvalidValue | None]


def violations(
    rules: Iterable[Rule], obj: Any, invalid: Collection[str] = ()
) -> list[InvalidValue]:
    """Every broken rule, skipping rules that read a field listed in ``invalid``."""
    found = []
    for rule in rules:
        if invalid and any(name in invalid for name in rule.reads):
            continue
        problem = rule.check(obj)
        if problem is not None:
            found.append(problem)
    return found


def enforce(rules: Iterable[Rule], obj: Any) -> None:
    """Raise the first broken rule (construction in Python stops at the first problem)."""
    for problem in violations(rules, obj):
        raise problem
