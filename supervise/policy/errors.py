"""`PolicyError`: every problem found in a policy, one line each, naming file, key and value."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from supervise.policy import _toml

__all__ = ["NO_VALUE", "PolicyError", "Problem"]

_MAX_VALUE_CHARS = 60


class _NoValue:
    """Marks a problem that has no offending value (an unreadable file, a syntax error)."""

    def __repr__(self) -> str:
        return "NO_VALUE"

    def __reduce__(self) -> str:
        return "NO_VALUE"  # unpickles as the module's one instance


NO_VALUE = _NoValue()


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def _shorten(text: str) -> str:
    if len(text) <= _MAX_VALUE_CHARS:
        return text
    return text[: _MAX_VALUE_CHARS - 3] + "..."


@attrs.frozen(slots=True)
class Problem:
    """One thing wrong with a policy.

    ``key`` is the full key path (``recovery.backoff.max``; "" when the file itself is the
    problem), ``value`` the offending value as read, ``allowed`` what is allowed or what went
    wrong, ``file`` the policy file (None for a dict), ``line`` set for TOML syntax errors.
    """

    key: str
    allowed: str
    value: object = NO_VALUE
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = self.file or ""
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        text = self.allowed
        if self.key:
            shown = "" if self.value is NO_VALUE else f" = {_shorten(_toml.value(self.value))}"
            text = f"{self.key}{shown}: {text}"
        line = f"{where}: {text}" if where else text
        return line.translate(_CONTROL)  # one line, whatever a file name or key holds


class PolicyError(ValueError):
    """A policy that cannot be used; ``problems`` lists everything wrong, ``str()`` one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        if not self.problems:
            raise ValueError("PolicyError needs at least one problem")
        super().__init__("\n".join(str(p) for p in self.problems))

    def __reduce__(self) -> tuple[type[PolicyError], tuple[tuple[Problem, ...]]]:
        return (type(self), (self.problems,))

    @property
    def file(self) -> str | None:
        """The file the problems were found in (None for a policy given as a dict)."""
        return self.problems[0].file
