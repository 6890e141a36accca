"""In-memory "nodes" for telemetry unit tests: a Telemetry handle whose spans and metrics stay
in memory, one per simulated node (each its own tracer provider and resource)."""

from collections.abc import Callable, Iterator

import attrs
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from supervise.telemetry import Telemetry, TelemetryConfig


@attrs.define
class Node:
    telemetry: Telemetry
    spans_exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_exporter.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans() if s.name == name]
        assert len(found) == 1, (name, [s.name for s in self.spans()])
        return found[0]

    def metric_points(self, name: str) -> list[object]:
        data = self.reader.get_metrics_data()
        points: list[object] = []
        if data is None:
            return points
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        points.extend(m.data.data_points)
        return points


@pytest.fixture
def make_node() -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(rank: int | None = 0, config: TelemetryConfig | None = None) -> Node:
        exporter = InMemorySpanExporter()
        reader = InMemoryMetricReader()
        telemetry = Telemetry.create(
            config or TelemetryConfig(),
            rank=rank,
            span_processors=[SimpleSpanProcessor(exporter)],
            metric_readers=[reader],
        )
        node = Node(telemetry, exporter, reader)
        made.append(node)
        return node

    yield make
    for node in made:
        node.telemetry.shutdown()
