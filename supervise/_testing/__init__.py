"""Test helpers for supervise and for tests built on it (not public API).

``OtelCollector``: a real collector (rotel) on loopback whose received spans and metrics a
test can read; the node-agent tests use it through the ``otel_collector`` fixture.
"""

from supervise._testing.collector import OtelCollector
from supervise._testing.otlp_sink import (
    OtlpSink,
    ReceivedEvent,
    ReceivedMetric,
    ReceivedPoint,
    ReceivedSpan,
)

__all__ = [
    "OtelCollector",
    "OtlpSink",
    "ReceivedEvent",
    "ReceivedMetric",
    "ReceivedPoint",
    "ReceivedSpan",
]
