"""Task spans (STAND-IN on branch `farmnode` with the FARM_API.md signatures: the `sched`
engineer owns this module; the lead keeps their version at merge)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.trace import Span

from supervise.telemetry import get_telemetry


@contextmanager
def attempt_span(task_id: str, attempt: int, node: str | int, target: str) -> Iterator[Span]:
    """A span for one attempt of a task on a node."""
    with get_telemetry().tracer.start_as_current_span(
        "supervise.task.attempt",
        attributes={
            "supervise.task.id": task_id,
            "supervise.task.attempt": attempt,
            "supervise.task.node": str(node),
            "supervise.task.target": target,
        },
    ) as span:
        yield span


@contextmanager
def step_span(task_id: str, attempt: int, step: str) -> Iterator[Span]:
    """A span for one step of an attempt."""
    with get_telemetry().tracer.start_as_current_span(
        "supervise.task.step",
        attributes={
            "supervise.task.id": task_id,
            "supervise.task.attempt": attempt,
            "supervise.task.step": step,
        },
    ) as span:
        yield span
