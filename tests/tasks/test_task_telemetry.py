"""Task telemetry: the runner emits a span per attempt (with how it ended), the context a span
per step that ran (replayed steps none) as a child of its attempt, the step durations, and
the farm's queue gauges and finished counter; with telemetry off nothing is recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import taskfuncs
import trio
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from supervise._validation import InvalidValue
from supervise.runtime import Backoff
from supervise.tasks import (
    InProcess,
    MemoryJournal,
    RetryPolicy,
    TaskPolicy,
    TaskRunner,
    TaskSpec,
    TaskState,
    run_local,
    unwrap,
)
from supervise.tasks.telemetry import FarmMetrics, attempt_span, step_span
from supervise.telemetry import (
    TASK_ATTEMPT_SPAN,
    TASK_STEP_SPAN,
    Attr,
    Metric,
    Telemetry,
    TelemetryConfig,
)
from supervise.telemetry import lifecycle as telemetry_setup
from supervise.telemetry.receiver import OtlpSink

HERE = Path(__file__).resolve().parent


@attrs.define
class Recorded:
    telemetry: Telemetry
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def points(self, name: str) -> list[object]:
        data = self.reader.get_metrics_data()
        out: list[object] = []
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        out.extend(m.data.data_points)
        return out


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorded]:
    """This process's telemetry, kept in memory."""
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tel = Telemetry.create(
        TelemetryConfig(),
        rank=0,
        span_processors=[SimpleSpanProcessor(exporter)],
        metric_readers=[reader],
    )
    monkeypatch.setattr(telemetry_setup._process, "current", tel)
    yield Recorded(tel, exporter, reader)
    tel.shutdown()


@pytest.fixture(autouse=True)
def _fresh_counters() -> Iterator[None]:
    taskfuncs.CALLS.clear()
    taskfuncs.FAIL_TIMES.clear()
    yield


async def test_a_retried_task_has_a_span_per_attempt_and_per_step_that_ran(
    recorded: Recorded, autojump_clock: trio.testing.MockClock
) -> None:
    taskfuncs.FAIL_TIMES["explode"] = 1
    policy = TaskPolicy(retry=RetryPolicy(backoff=Backoff(initial=1.0, max=2.0)))
    spec = TaskSpec("taskfuncs:two_steps", (21,), task_id="t1", policy=policy)
    result = await TaskRunner(spec, InProcess(spec, MemoryJournal(), node="n0")).run()
    assert unwrap(result) == {"a": 42, "attempt": 2}

    attempts = sorted(recorded.spans(TASK_ATTEMPT_SPAN), key=lambda s: s.attributes[Attr.ATTEMPT])
    assert [dict(s.attributes) for s in attempts] == [
        {
            Attr.TASK_ID: "t1",
            Attr.ATTEMPT: n,
            Attr.TASK_TARGET: "taskfuncs:two_steps",
            Attr.TASK_NODE: "n0",
            Attr.TASK_OUTCOME: outcome,
        }
        for n, outcome in ((1, "raised"), (2, "returned"))
    ]
    steps = recorded.spans(TASK_STEP_SPAN)
    ran = [(s.attributes[Attr.ATTEMPT], s.attributes[Attr.TASK_STEP]) for s in steps]
    assert sorted(ran) == [(1, "double"), (1, "explode"), (2, "explode")]  # double replayed
    by_attempt = {s.attributes[Attr.ATTEMPT]: s for s in attempts}
    for s in steps:
        parent = by_attempt[s.attributes[Attr.ATTEMPT]]
        assert s.parent is not None and s.parent.span_id == parent.context.span_id
        assert s.context.trace_id == parent.context.trace_id
    failed = [s for s in steps if s.status.status_code is StatusCode.ERROR]
    assert [(s.attributes[Attr.ATTEMPT], s.attributes[Attr.TASK_STEP]) for s in failed] == [
        (1, "explode")
    ]
    (hist,) = [p for p in recorded.points(Metric.TASK_STEP_DURATION.name) if not p.attributes]
    (errors,) = [p for p in recorded.points(Metric.TASK_STEP_DURATION.name) if p.attributes]
    assert (hist.count, errors.count, errors.attributes["error.type"]) == (2, 1, "ValueError")


async def test_a_stopped_attempt_says_so(
    recorded: Recorded, autojump_clock: trio.testing.MockClock
) -> None:
    spec = TaskSpec("taskfuncs:slow_steps", ("/dev/null", 3), task_id="t2")
    runner = TaskRunner(spec, InProcess(spec, MemoryJournal(), node="n0"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(0.01)  # the first step runs in its thread
        assert runner.state is TaskState.RUNNING
        runner.cancel()
    (span,) = recorded.spans(TASK_ATTEMPT_SPAN)
    assert span.attributes[Attr.TASK_OUTCOME] == "stopped"


def test_spans_name_a_node_rank_as_node_rank(recorded: Recorded) -> None:
    with attempt_span("t", 2, 3, "m:f"):
        with step_span("t", 2, "s"):
            pass
    (span,) = recorded.spans(TASK_ATTEMPT_SPAN)
    assert span.attributes[Attr.NODE_RANK] == 3 and Attr.TASK_NODE not in span.attributes


def test_nothing_is_recorded_with_telemetry_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry_setup._process, "current", Telemetry.disabled())
    with attempt_span("t", 1, "n", "m:f") as a, step_span("t", 1, "s") as s:
        assert not a.is_recording() and not s.is_recording()


def test_farm_metrics_gauges_and_counter(recorded: Recorded) -> None:
    farm = FarmMetrics()
    farm.set_counts({TaskState.PENDING: 4, TaskState.RUNNING: 2, TaskState.COMPLETED: 9})
    farm.finished(TaskState.COMPLETED)
    farm.finished(TaskState.COMPLETED)
    farm.finished(TaskState.FAILED)
    (queued,) = recorded.points(Metric.TASKS_QUEUED.name)
    (running,) = recorded.points(Metric.TASKS_RUNNING.name)
    assert (queued.value, running.value) == (4, 2)
    finished = {
        p.attributes[Attr.TASK_STATE]: p.value for p in recorded.points(Metric.TASKS_FINISHED.name)
    }
    assert finished == {"completed": 2, "failed": 1}
    with pytest.raises(InvalidValue, match="completed, failed or cancelled"):
        farm.finished(TaskState.RUNNING)
    with pytest.raises(InvalidValue, match=r"counts\[pending\]"):
        farm.set_counts({TaskState.PENDING: -1})
    farm.close()
    farm.set_counts({TaskState.PENDING: 7})
    assert recorded.points(Metric.TASKS_QUEUED.name) == []  # closed: reported no more


def test_farm_metrics_on_a_given_meter_create_instruments_once() -> None:
    reader = InMemoryMetricReader()
    tel = Telemetry.create(TelemetryConfig(), metric_readers=[reader])
    try:
        a, b = FarmMetrics(tel.meter), FarmMetrics(tel.meter)
        assert a._instruments is b._instruments
        a.set_counts({TaskState.PENDING: 1})
        b.set_counts({TaskState.PENDING: 2})
        data = reader.get_metrics_data()
        values = [
            p.value
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == Metric.TASKS_QUEUED.name
            for p in m.data.data_points
        ]
        assert values == [3]  # two farms in one process: summed
    finally:
        tel.shutdown()


async def test_run_local_workers_send_their_step_spans_as_children_of_the_attempt(
    recorded: Recorded, tmp_path: Path
) -> None:
    """A real worker process: its step spans reach the collector its OTEL_* names, in the
    trace of the runner's attempt span (TRACEPARENT in its environment)."""
    spec = TaskSpec("taskfuncs:two_steps", (21,), task_id="t4")
    env = {
        "PYTHONPATH": str(HERE),
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    with OtlpSink() as sink:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
        result = await run_local(spec, tmp_path / "t", journal="disk", env=env)
        assert unwrap(result) == {"a": 42, "attempt": 1}
        steps = sink.spans(TASK_STEP_SPAN)  # the worker flushed before it exited
    (attempt,) = recorded.spans(TASK_ATTEMPT_SPAN)
    assert sorted(s.attributes[Attr.TASK_STEP] for s in steps) == ["double", "explode"]
    for s in steps:
        assert s.trace_id == format(attempt.context.trace_id, "032x")
        assert s.parent_span_id == format(attempt.context.span_id, "016x")
