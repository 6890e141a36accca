"""When a task checkpoints and how it retries: frozen specs, validated at construction.

Checkpoint strategies (seed 004): `EveryStep` (the default: a step counts as done only once its
result is committed), `EverySeconds`, `AtMilestones` (progress fractions), `Manual` (only
``await ctx.checkpoint()``), `Automatic` (denser early, sparser late: the gap between
checkpoints starts at ``first`` seconds and grows by ``growth`` up to ``max``). Whatever the
strategy, a task's end commits everything. `RetryPolicy`: application errors retry with the
policy's `Backoff` unless their type is non-retryable; losses of the worker or node requeue
without spending that budget, up to ``max_losses`` (then the task is dead-lettered).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from supervise._validation import InvalidValue, instance_of, number
from supervise.policy.sections import DEFAULT_BACKOFF
from supervise.runtime.backoff import Backoff


class CheckpointMode(enum.StrEnum):
    """The checkpoint strategies."""

    EVERY_STEP = "every_step"
    EVERY_SECONDS = "every_seconds"
    MILESTONES = "milestones"
    MANUAL = "manual"
    AUTOMATIC = "automatic"


def _milestones(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not value:
        raise InvalidValue(attr.name, value, "must be a non-empty list of fractions")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
            raise InvalidValue(attr.name, value, "every milestone must be a fraction in (0, 1]")
    if list(value) != sorted(set(value)):
        raise InvalidValue(attr.name, value, "must be strictly increasing")


def _to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@attrs.frozen(slots=True)
class EveryStep:
    """Commit after every step (the default)."""

    MODE: ClassVar[CheckpointMode] = CheckpointMode.EVERY_STEP


@attrs.frozen(slots=True)
class EverySeconds:
    """Commit after the first step that ends ``seconds`` or more after the last commit."""

    MODE: ClassVar[CheckpointMode] = CheckpointMode.EVERY_SECONDS
    seconds: float = attrs.field(validator=number(gt=0))


@attrs.frozen(slots=True)
class AtMilestones:
    """Commit at the first step boundary after progress crosses each fraction."""

    MODE: ClassVar[CheckpointMode] = CheckpointMode.MILESTONES
    fractions: tuple[float, ...] = attrs.field(converter=_to_tuple, validator=_milestones)


@attrs.frozen(slots=True)
class Manual:
    """Commit only on ``await ctx.checkpoint()`` (and at the end)."""

    MODE: ClassVar[CheckpointMode] = CheckpointMode.MANUAL


@attrs.frozen(slots=True)
class Automatic:
    """Denser early, sparser late: gaps of ``first``, ``first*growth``, ... up to ``max`` s."""

    MODE: ClassVar[CheckpointMode] = CheckpointMode.AUTOMATIC
    first: float = attrs.field(default=1.0, validator=number(gt=0))
    max: float = attrs.field(default=60.0, validator=number(gt=0))
    growth: float = attrs.field(default=2.0, validator=number(ge=1))

    def __attrs_post_init__(self) -> None:
        if self.max < self.first:
            raise InvalidValue("max", self.max, f"must be >= first ({self.first:g})")

    def gap(self, n: int) -> float:
        """Seconds to wait after the n-th commit (n >= 0)."""
        if n * math.log(self.growth) >= math.log(self.max / self.first):
            return self.max  # decided in logs: growth ** n overflows a float for large n
        return min(self.max, self.first * self.growth**n)


Checkpoint = EveryStep | EverySeconds | AtMilestones | Manual | Automatic
_BY_MODE: Mapping[CheckpointMode, type[Checkpoint]] = {
    c.MODE: c for c in (EveryStep, EverySeconds, AtMilestones, Manual, Automatic)
}


def checkpoint_to_dict(spec: Checkpoint) -> dict[str, Any]:
    """Plain data for a checkpoint spec (``{"mode": ..., fields...}``)."""
    out: dict[str, Any] = {"mode": str(spec.MODE)}
    out.update({f.name: _plain_field(getattr(spec, f.name)) for f in attrs.fields(type(spec))})
    return out


def _plain_field(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def checkpoint_from_dict(data: Mapping[str, Any]) -> Checkpoint:
    """The spec `checkpoint_to_dict` wrote; `InvalidValue` names a bad mode or field."""
    fields = dict(data)
    mode = fields.pop("mode", None)
    try:
        cls = _BY_MODE[CheckpointMode(mode)]
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in CheckpointMode)
        raise InvalidValue("checkpoint.mode", mode, f"must be one of {allowed}") from None
    try:
        return cls(**fields)
    except TypeError as e:
        raise InvalidValue(f"checkpoint ({mode})", fields, str(e)) from None


class Cadence:
    """The running side of a checkpoint spec: tells the context when a commit is due."""

    def __init__(self, spec: Checkpoint, now: float, progress: float = 0.0) -> None:
        self.spec = spec
        self._last = now
        self._commits = 0
        self._next_milestone = 0
        if isinstance(spec, AtMilestones):  # milestones already passed before a resume
            while (
                self._next_milestone < len(spec.fractions)
                and spec.fractions[self._next_milestone] <= progress
            ):
                self._next_milestone += 1
        self._milestone_due = False

    def progressed(self, fraction: float) -> None:
        """Progress moved to ``fraction``: a milestone crossed makes a commit due."""
        spec = self.spec
        if isinstance(spec, AtMilestones):
            while (
                self._next_milestone < len(spec.fractions)
                and spec.fractions[self._next_milestone] <= fraction
            ):
                self._next_milestone += 1
                self._milestone_due = True

    def due(self, now: float) -> bool:
        """Whether to commit at this step boundary."""
        spec = self.spec
        if isinstance(spec, EveryStep):
            return True
        if isinstance(spec, EverySeconds):
            return now - self._last >= spec.seconds
        if isinstance(spec, Automatic):
            return now - self._last >= spec.gap(self._commits)
        if isinstance(spec, AtMilestones):
            return self._milestone_due
        return False

    def committed(self, now: float) -> None:
        """A commit happened at ``now``."""
        self._last = now
        self._commits += 1
        self._milestone_due = False


def _exception_types(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in value
    ):
        raise InvalidValue(attr.name, value, "must be a list of exception classes")


def type_name(cls: type) -> str:
    """An exception class's name as the journal records it (``module.QualName``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class Verdict(enum.StrEnum):
    """What to do after an attempt raised."""

    RETRY = "retry"
    NON_RETRYABLE = "non_retryable"
    EXHAUSTED = "retries_exhausted"


@attrs.frozen(slots=True)
class RetryPolicy:
    """Application retries (``max_attempts`` attempts that may raise, with ``backoff`` between)
    and the bound on losses (``max_losses`` requeues after a dead worker or node)."""

    max_attempts: int = attrs.field(default=3, validator=number(ge=1, integer=True))
    backoff: Backoff = attrs.field(default=DEFAULT_BACKOFF, validator=instance_of(Backoff))
    non_retryable: tuple[type[BaseException], ...] = attrs.field(
        default=(), converter=_to_tuple, validator=_exception_types
    )
    max_losses: int = attrs.field(default=5, validator=number(ge=0, integer=True))

    def verdict(self, errors: int, error_mro: tuple[str, ...]) -> Verdict:
        """After the ``errors``-th application error (whose class and bases are named in
        ``error_mro``): retry, or stop and why."""
        names = {type_name(t) for t in self.non_retryable}
        if names.intersection(error_mro):
            return Verdict.NON_RETRYABLE
        if errors >= self.max_attempts:
            return Verdict.EXHAUSTED
        return Verdict.RETRY

    def delay(self, errors: int, u: float = 0.5) -> float:
        """Seconds to wait before the attempt after the ``errors``-th error."""
        return self.backoff.delay(errors, u)

    def dead_letter(self, losses: int) -> bool:
        """Whether the ``losses``-th loss is one too many."""
        return losses > self.max_losses


def _checkpoint(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, tuple(_BY_MODE.values())):
        names = ", ".join(c.__name__ for c in _BY_MODE.values())
        raise InvalidValue(attr.name, value, f"must be one of {names}")


@attrs.frozen(slots=True)
class TaskPolicy:
    """A task's checkpoint strategy and retry policy."""

    checkpoint: Checkpoint = attrs.field(factory=EveryStep, validator=_checkpoint)
    retry: RetryPolicy = attrs.field(factory=RetryPolicy, validator=instance_of(RetryPolicy))
