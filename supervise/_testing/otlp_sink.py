"""The OTLP/HTTP receiver tests read spans from (it moved to `supervise.telemetry.receiver` when
`supervise demo` started using it; this name stays for tests built on it)."""

from supervise.telemetry.receiver import (
    OtlpSink,
    ReceivedEvent,
    ReceivedMetric,
    ReceivedPoint,
    ReceivedSpan,
    Value,
    decode_attributes,
    decode_value,
)

__all__ = [
    "OtlpSink",
    "ReceivedEvent",
    "ReceivedMetric",
    "ReceivedPoint",
    "ReceivedSpan",
    "Value",
    "decode_attributes",
    "decode_value",
]
