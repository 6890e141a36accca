"""The agents' telemetry settings: their spans come to the demo's own OTLP receiver, and from
there also to the user's collector when ``OTEL_*`` names one (the user's exporters and
resource settings are kept; only the OTLP endpoints change)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from supervise.telemetry.config import TelemetryConfig

FAULTS_ENV = "SUPERVISE_DEMO_FAULTS"  # supervise._demo.train's fault directory
# Inherited variables that would make the demo's agents or workers something else.
_DROP_EXACT = frozenset(
    {
        "SUPERVISE_AGENT",
        "SUPERVISE_AGENT_TOKEN",
        "SUPERVISE_GENERATION",
        "SUPERVISE_NODE_RANK",
        FAULTS_ENV,
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    }
)


def agent_env(
    base: Mapping[str, str],
    *,
    receiver: str,
    faults_dir: Path,
    user: TelemetryConfig,
) -> dict[str, str]:
    """The environment of every demo agent (its workers inherit it)."""
    env = {k: v for k, v in base.items() if k not in _DROP_EXACT}
    traces = ["otlp"] + (["console"] if "console" in user.traces.exporters else [])
    metrics = ["otlp"] + (["console"] if "console" in user.metrics.exporters else [])
    env.update(
        {
            "OTEL_TRACES_EXPORTER": ",".join(traces),
            "OTEL_METRICS_EXPORTER": ",".join(metrics),
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.rstrip("/") + "/v1/traces",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": receiver.rstrip("/") + "/v1/metrics",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": base.get("OTEL_METRIC_EXPORT_INTERVAL", "10000"),
            FAULTS_ENV: str(faults_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env
