"""Task telemetry: a span per attempt and per step, the step-duration histogram, and the
farm's gauges and counters (queue depth, running, finished by state).

Names are in `supervise.telemetry.names` (``supervise.task.*``); with telemetry off each helper
costs one check and records nothing.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator, Mapping
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import Meter
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from supervise._validation import InvalidValue
from supervise.tasks.states import TERMINAL, TaskState
from supervise.telemetry import (
    TASK_ATTEMPT_SPAN,
    TASK_STEP_SPAN,
    Attr,
    Instruments,
    Telemetry,
    extract,
    get_telemetry,
    inject,
    instruments_for,
)

__all__ = ["FarmMetrics", "attempt_span", "parent_from_env", "step_span", "trace_env"]

TRACE_ENV: Final = {"traceparent": "TRACEPARENT", "tracestate": "TRACESTATE"}
"""W3C trace context a worker process gets in its environment (the env-carrier convention)."""


def trace_env() -> dict[str, str]:
    """The current span as ``TRACEPARENT`` / ``TRACESTATE`` for a worker's environment (empty
    values when nothing is traced, so an inherited context does not leak in)."""
    carrier = inject()
    return {env: carrier.get(key, "") for key, env in TRACE_ENV.items()}


def parent_from_env(environ: Mapping[str, str]) -> Context:
    """The context `trace_env` handed this process: its spans are children of that span."""
    return extract({key: environ.get(env, "") for key, env in TRACE_ENV.items()})


def _off(tel: Telemetry) -> bool:
    return not (tel.traces_enabled or tel.metrics_enabled)


@contextlib.contextmanager
def _span(tel: Telemetry, name: str, values: dict[str, AttributeValue]) -> Iterator[Span]:
    """A span current while the block runs; an exception marks it (a trio.Cancelled — a pause,
    a cancel — is marked with its type, not recorded as a failure of the task)."""
    span = tel.tracer.start_span(name, attributes=values)
    try:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield span
    except BaseException as exc:
        if isinstance(exc, Exception):
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        else:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        span.end()


def attempt_span(
    task_id: str, attempt: int, node: str | int, target: str, *, telemetry: Telemetry | None = None
) -> contextlib.AbstractContextManager[Span]:
    """Span ``supervise.task.attempt`` around one attempt of a task (its node a rank or a
    name); the caller may set ``supervise.task.outcome`` on it."""
    tel = get_telemetry() if telemetry is None else telemetry
    if not tel.traces_enabled:
        return contextlib.nullcontext(trace.INVALID_SPAN)
    values: dict[str, AttributeValue] = {
        Attr.TASK_ID: task_id,
        Attr.ATTEMPT: attempt,
        Attr.TASK_TARGET: target,
    }
    if isinstance(node, int) and not isinstance(node, bool):
        values[Attr.NODE_RANK] = node
    else:
        values[Attr.TASK_NODE] = str(node)
    return _span(tel, TASK_ATTEMPT_SPAN, values)


@contextlib.contextmanager
def _timed_step(tel: Telemetry, values: dict[str, AttributeValue]) -> Iterator[Span]:
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        if tel.traces_enabled:
            with _span(tel, TASK_STEP_SPAN, values) as span:
                yield span
        else:
            yield trace.INVALID_SPAN
    except BaseException as exc:
        error = exc
        raise
    finally:
        attrs: dict[str, AttributeValue] = {}
        if error is not None:
            attrs["error.type"] = type(error).__name__
        tel.metrics.task_step_duration.record(time.perf_counter() - started, attrs)


def step_span(
    task_id: str, attempt: int, step: str, *, telemetry: Telemetry | None = None
) -> contextlib.AbstractContextManager[Span]:
    """Span ``supervise.task.step`` around one step that runs (and its commit), and its
    duration in ``supervise.task.step.duration``."""
    tel = get_telemetry() if telemetry is None else telemetry
    if _off(tel):
        return contextlib.nullcontext(trace.INVALID_SPAN)
    values: dict[str, AttributeValue] = {
        Attr.TASK_ID: task_id,
        Attr.ATTEMPT: attempt,
        Attr.TASK_STEP: step,
    }
    return _timed_step(tel, values)


def _instruments(meter: Meter | None) -> Instruments:
    """The instruments of ``meter`` (created once per meter), or of this process's telemetry."""
    return get_telemetry().metrics if meter is None else instruments_for(meter)


class FarmMetrics:
    """A farm's queue metrics: ``set_counts`` feeds the queued / running gauges (read when
    metrics are exported), ``finished`` counts each task that ended, by its final state."""

    def __init__(self, meter: Meter | None = None) -> None:
        self._instruments = _instruments(meter)
        self._counts: dict[str, int] = {}
        me = weakref.ref(self)

        def source() -> Mapping[str, int]:
            alive = me()
            return {} if alive is None else alive._counts

        self._unregister = self._instruments.register_task_source(source)

    def set_counts(self, counts: Mapping[TaskState, int]) -> None:
        """How many tasks are in each state now (states left out: none)."""
        checked: dict[str, int] = {}
        for state, n in counts.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidValue(f"counts[{state}]", n, "must be an integer >= 0")
            checked[TaskState(state).value] = n
        self._counts = checked

    def finished(self, state: TaskState) -> None:
        """A task ended in ``state`` (completed, failed or cancelled)."""
        final = TaskState(state)
        if final not in TERMINAL:
            raise InvalidValue("state", final.value, "must be completed, failed or cancelled")
        self._instruments.tasks_finished.add(1, {Attr.TASK_STATE: final.value})

    def close(self) -> None:
        """Stop reporting this farm's counts."""
        self._unregister()
