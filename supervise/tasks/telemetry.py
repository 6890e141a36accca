"""Task spans and farm metrics.

STAND-IN written on branch `farm` with the FARM_API.md signatures; the `sched` engineer owns
this module and the lead keeps their version at merge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from supervise.tasks.states import TaskState


@contextlib.contextmanager
def attempt_span(task_id: str, attempt: int, node: str | int, target: str) -> Iterator[None]:
    yield None


@contextlib.contextmanager
def step_span(task_id: str, attempt: int, step: str) -> Iterator[None]:
    yield None


class FarmMetrics:
    """Queue depth and outcome counters (stand-in: counts kept in memory)."""

    def __init__(self, meter: Any = None) -> None:
        self.counts: dict[TaskState, int] = {}
        self.done: dict[TaskState, int] = {}

    def set_counts(self, counts: Mapping[TaskState, int]) -> None:
        self.counts = dict(counts)

    def finished(self, state: TaskState) -> None:
        self.done[state] = self.done.get(state, 0) + 1
