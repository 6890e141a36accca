"""OpenTelemetry traces and metrics, structured logs, and the telemetry names (a contract).

Everything is off unless the standard ``OTEL_*`` variables ask for it (OTLP over
HTTP/protobuf). The agent calls ``setup_telemetry(rank=...)`` and ``configure_logging()`` at
start and ``shutdown_telemetry()`` at exit; one recovery is one ``RecoveryTrace``, joined on
other nodes through the W3C carrier it ``inject``s into the transport's message header.
"""

from supervise.telemetry.attributes import attributes
from supervise.telemetry.config import SignalConfig, TelemetryConfig, TelemetryError
from supervise.telemetry.context import extract, inject, untraced, using
from supervise.telemetry.lifecycle import (
    Telemetry,
    get_telemetry,
    setup_telemetry,
    shutdown_telemetry,
)
from supervise.telemetry.logs import add_trace_context, configure_logging
from supervise.telemetry.metrics import Instruments, instruments_for
from supervise.telemetry.names import (
    DURATION_BUCKETS_S,
    RECOVERY_SPAN,
    SCOPE,
    SERVICE_NAME,
    SHORT_ATTRIBUTES,
    TASK_ATTEMPT_SPAN,
    TASK_STEP_SPAN,
    THROUGHPUT_BUCKETS,
    Attr,
    Instrument,
    Metric,
    Outcome,
    Phase,
    RecoveryEvent,
    SnapshotOp,
    Source,
    Trigger,
)
from supervise.telemetry.trace import OperationSpan, RecoveryTrace, snapshot_span

__all__ = [
    "DURATION_BUCKETS_S",
    "RECOVERY_SPAN",
    "SCOPE",
    "SERVICE_NAME",
    "SHORT_ATTRIBUTES",
    "TASK_ATTEMPT_SPAN",
    "TASK_STEP_SPAN",
    "THROUGHPUT_BUCKETS",
    "Attr",
    "Instrument",
    "Instruments",
    "Metric",
    "OperationSpan",
    "Outcome",
    "Phase",
    "RecoveryEvent",
    "RecoveryTrace",
    "SignalConfig",
    "SnapshotOp",
    "Source",
    "Telemetry",
    "TelemetryConfig",
    "TelemetryError",
    "Trigger",
    "add_trace_context",
    "attributes",
    "configure_logging",
    "extract",
    "get_telemetry",
    "inject",
    "instruments_for",
    "setup_telemetry",
    "shutdown_telemetry",
    "snapshot_span",
    "untraced",
    "using",
]
