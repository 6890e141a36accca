"""OTLP/HTTP exporters that count what they could not deliver and can be aborted; span ids
that no ``random.seed`` can repeat.

Imported only when telemetry is on. Counting lets ``shutdown`` say whether anything was lost;
aborting (shutting the exporter down early) cuts a retry loop short, so an agent whose
collector is down still exits within its shutdown timeout.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator


class CountingSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` that counts undelivered spans; ``shutdown`` is idempotent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        self._stopped = False
        self.undelivered = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export; spans of a failed batch are counted as undelivered."""
        result = super().export(spans)
        if result is not SpanExportResult.SUCCESS:
            with self._count_lock:
                self.undelivered += len(spans)
        return result

    def shutdown(self) -> None:
        """Stop (and interrupt a retry in progress); later calls do nothing."""
        with self._count_lock:
            if self._stopped:
                return
            self._stopped = True
        super().shutdown()  # type: ignore[no-untyped-call]


class CountingMetricExporter(OTLPMetricExporter):
    """``OTLPMetricExporter`` that counts failed exports; ``shutdown`` is idempotent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_lock = threading.Lock()
        self._stopped = False
        self.undelivered = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float | None = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export; a failed export is counted as one undelivered batch."""
        result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is not MetricExportResult.SUCCESS:
            with self._count_lock:
                self.undelivered += 1
        return result

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Stop (and interrupt a retry in progress); later calls do nothing."""
        with self._count_lock:
            if self._stopped:
                return
            self._stopped = True
        super().shutdown(timeout_millis=timeout_millis, **kwargs)


_IDS = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _IDS.seed(os.urandom(32)))  # a child must not repeat


class PrivateRandomIds(RandomIdGenerator):
    """Trace and span ids from a generator of our own, seeded from ``os.urandom``.

    The SDK's default draws from the global ``random`` module, which training scripts seed
    (every rank alike) and which a restored snapshot rewinds: their spans would repeat ids.
    """

    def generate_span_id(self) -> int:
        """A random, valid (non-zero) 64-bit span id."""
        span_id = 0
        while span_id == 0:
            span_id = _IDS.getrandbits(64)
        return span_id

    def generate_trace_id(self) -> int:
        """A random, valid (non-zero) 128-bit trace id."""
        trace_id = 0
        while trace_id == 0:
            trace_id = _IDS.getrandbits(128)
        return trace_id
