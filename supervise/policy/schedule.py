"""The capture decision: given the step, the time and the metrics, capture now, and why?

Pure and cheap (the Snapshotter asks every training step): `CaptureSchedule` is compiled once
from the policy (milestones become step numbers), `ScheduleState` is what it remembers
between captures, and `decide` neither mutates nor reads a clock.

Step and milestone triggers depend on the step number only, so every rank decides the same;
seconds and metrics differ between ranks, so with those triggers one rank should decide
(or the metric be all-reduced) for all ranks to capture the same versions.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

import attrs

from supervise._validation import number, one_of
from supervise.policy._fields import fractions, to_fractions

if TYPE_CHECKING:
    from supervise.policy.model import Policy
    from supervise.policy.sections import SnapshotSchedule

__all__ = ["REASONS", "CaptureSchedule", "Reason", "ScheduleState"]

Reason = Literal["milestone", "best", "steps", "seconds"]
REASONS: tuple[Reason, ...] = ("milestone", "best", "steps", "seconds")
"""Every reason, in the order they win when several triggers fire at the same step."""


@attrs.frozen(slots=True)
class ScheduleState:
    """What the schedule remembers: the last captured step, when it (or the run) started, the
    best value of the watched metric among captures so far."""

    last_step: int | None = None
    last_time: float = 0.0
    best: float | None = None


def milestone_steps(milestones: tuple[float, ...], total_steps: int) -> tuple[int, ...]:
    """Step numbers (0-based) after which a run of ``total_steps`` reaches each fraction.

    Progress after step ``s`` is ``(s + 1) / total_steps``; fractions are taken as written in
    decimal (0.7 is 7/10, not its binary neighbour), so 0.7 of 10 steps is step 6.
    """
    steps = set()
    for fraction in milestones:
        exact = Fraction(repr(float(fraction))) * total_steps
        steps.add(max(0, math.ceil(exact) - 1))
    return tuple(sorted(steps))


def _total_steps(
    _inst: CaptureSchedule, attr: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None:
        number(ge=1, integer=True)(_inst, attr, value)


@attrs.frozen(slots=True)
class CaptureSchedule:
    """A `SnapshotSchedule` compiled for one run: whether a step should be captured, and why.

    Use `from_policy` (or `from_schedule`); ``total_steps`` None leaves milestones inert.
    """

    every_steps: int = attrs.field(default=0, validator=number(ge=0, integer=True))
    every_seconds: float = attrs.field(default=0.0, validator=number(ge=0))
    metric: str = ""
    mode: Literal["min", "max"] = attrs.field(default="min", validator=one_of(("min", "max")))
    milestones: tuple[float, ...] = attrs.field(
        default=(), converter=to_fractions, validator=fractions
    )
    total_steps: int | None = attrs.field(default=None, validator=_total_steps)
    _milestone_steps: tuple[int, ...] = attrs.field(init=False, eq=False, repr=False)
    _milestone_set: frozenset[int] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        steps = (
            () if self.total_steps is None else milestone_steps(self.milestones, self.total_steps)
        )
        object.__setattr__(self, "_milestone_steps", steps)
        object.__setattr__(self, "_milestone_set", frozenset(steps))

    @classmethod
    def from_schedule(
        cls,
        schedule: SnapshotSchedule,
        *,
        best_mode: Literal["min", "max"] = "min",
        total_steps: int | None = None,
    ) -> CaptureSchedule:
        """Compile ``schedule``; ``best_mode`` says whether a lower or higher metric is better."""
        return cls(
            every_steps=schedule.every_steps,
            every_seconds=schedule.every_seconds,
            metric=schedule.on_best,
            mode=best_mode,
            milestones=schedule.milestones,
            total_steps=total_steps,
        )

    @classmethod
    def from_policy(cls, policy: Policy, *, total_steps: int | None = None) -> CaptureSchedule:
        """Compile ``policy.snapshot``; a new best is judged by ``policy.retention.best_mode``."""
        return cls.from_schedule(
            policy.snapshot, best_mode=policy.retention.best_mode, total_steps=total_steps
        )

    @property
    def milestone_step_numbers(self) -> tuple[int, ...]:
        """The steps at which milestones fire (empty when ``total_steps`` is unknown)."""
        return self._milestone_steps

    def start(
        self, now: float, *, step: int | None = None, best: float | None = None
    ) -> ScheduleState:
        """The state at the start of a run; after a restore pass the restored step (and the
        best metric among kept snapshots) so the schedule carries on where it left off."""
        return ScheduleState(last_step=step, last_time=now, best=best)

    def decide(
        self,
        state: ScheduleState,
        step: int,
        now: float,
        metrics: Mapping[str, float] | None = None,
    ) -> Reason | None:
        """Whether to capture after ``step`` completed at time ``now``, and why (None: don't).

        - "milestone": the run reached a progress fraction since the last capture;
        - "best": the watched metric beats the best captured so far;
        - "steps": ``step`` is a multiple of ``every_steps``, or one was skipped since the last
          capture (steps need not arrive one by one);
        - "seconds": ``every_seconds`` passed since the last capture (or the start).

        A step that was just captured is not captured again.
        """
        last = state.last_step
        if last == step:
            return None
        if self._milestone_steps:
            if last is None or last < step:
                i = bisect_right(self._milestone_steps, -1 if last is None else last)
                if i < len(self._milestone_steps) and self._milestone_steps[i] <= step:
                    return "milestone"
            elif step in self._milestone_set:
                return "milestone"
        if self.metric and metrics is not None:
            raw = metrics.get(self.metric)
            if raw is not None and self._improves(raw, state.best):
                return "best"
        every = self.every_steps
        if every and (
            step % every == 0 or last is None or (last < step and step // every != last // every)
        ):
            return "steps"
        if self.every_seconds and now - state.last_time >= self.every_seconds:
            return "seconds"
        return None

    def record(
        self,
        state: ScheduleState,
        step: int,
        now: float,
        metrics: Mapping[str, float] | None = None,
    ) -> ScheduleState:
        """The state after a capture of ``step`` at ``now`` committed (for any reason)."""
        best = state.best
        if self.metric and metrics is not None:
            raw = metrics.get(self.metric)
            if raw is not None and self._improves(raw, best):
                best = float(raw)
        return ScheduleState(last_step=step, last_time=now, best=best)

    def _improves(self, raw: object, best: float | None) -> bool:
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"metric {self.metric!r} must be a number, got {raw!r}") from None
        if value != value:  # noqa: PLR0124 (NaN is never a best)
            return False
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best
