"""Which versions to keep in RAM and which to load: pure decisions over version records.

Order of versions is the training step. ``head`` is the step the training timeline is at
(the last commit or restore): versions newer than it belong to a rolled-back future, so they
are never "latest" and only ``keep_best`` may keep them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import attrs

from supervise._validation import number, one_of


@attrs.frozen(slots=True)
class VersionInfo:
    """A committed version as users and the agent see it."""

    step: int
    generation: int
    wall_time: float
    nbytes: int
    metrics: Mapping[str, float] = attrs.field(factory=dict)
    source: str = "local"  # local | peer | disk

    @property
    def version(self) -> int:
        """The version number (the step it captured)."""
        return self.step


@attrs.frozen(slots=True)
class RetentionRule:
    """keep_last / keep_best (by ``best_metric``, ``best_mode``): the RAM retention knobs."""

    keep_last: int = attrs.field(default=1, validator=number(ge=1, integer=True))
    keep_best: int = attrs.field(default=0, validator=number(ge=0, integer=True))
    best_metric: str = "loss"
    best_mode: Literal["min", "max"] = attrs.field(default="min", validator=one_of(("min", "max")))

    @property
    def slots(self) -> int:
        """Arena slots needed: every retained version plus one free slot to write into."""
        return self.keep_last + self.keep_best + 1


def _metric(v: VersionInfo, rule: RetentionRule) -> float | None:
    value = v.metrics.get(rule.best_metric)
    if value is None or math.isnan(value):
        return None
    return value


def ranked_best(versions: Iterable[VersionInfo], rule: RetentionRule) -> list[VersionInfo]:
    """Versions carrying the metric, best first (ties: the newer step first)."""
    scored = [(m, v) for v in versions if (m := _metric(v, rule)) is not None]
    sign = 1.0 if rule.best_mode == "min" else -1.0
    scored.sort(key=lambda mv: (sign * mv[0], -mv[1].step))
    return [v for _, v in scored]


def retained(versions: Sequence[VersionInfo], rule: RetentionRule, head: int | None) -> set[int]:
    """Steps to keep: the ``keep_last`` newest at or below ``head`` and the ``keep_best`` best."""
    current = sorted((v.step for v in versions if head is None or v.step <= head), reverse=True)
    keep = set(current[: rule.keep_last])
    if rule.keep_best:
        keep.update(v.step for v in ranked_best(versions, rule)[: rule.keep_best])
    return keep


def candidates(
    versions: Sequence[VersionInfo],
    which: str | int,
    rule: RetentionRule,
    head: int | None,
) -> list[VersionInfo]:
    """Versions to try for a restore, in order: the chosen one, then older ones (fallbacks).

    ``which`` is "latest", "best" or a version number. Raises ValueError for anything else.
    An unknown version number yields an empty list.
    """
    by_step: Mapping[int, VersionInfo] = {v.step: v for v in versions}
    if which == "latest":
        steps = [s for s in by_step if head is None or s <= head]
        if not steps:
            return []
        first = by_step[max(steps)]
    elif which == "best":
        ranked = ranked_best(by_step.values(), rule)
        if not ranked:
            return []
        first = ranked[0]
    elif isinstance(which, int) and not isinstance(which, bool) and which >= 0:
        if which not in by_step:
            return []
        first = by_step[which]
    else:
        raise ValueError(f"which = {which!r}: must be 'latest', 'best' or a version number >= 0")
    older = sorted((s for s in by_step if s < first.step), reverse=True)
    return [first, *(by_step[s] for s in older)]
