"""The agents' environment: spans to the demo's receiver, the user's OTEL_* choices kept."""

from __future__ import annotations

from pathlib import Path

from supervise._demo.otel import agent_env
from supervise._demo.reference import reference_env
from supervise.telemetry.config import TelemetryConfig


def test_agents_export_to_the_demo_and_keep_the_users_settings(tmp_path: Path) -> None:
    user = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_TRACES_EXPORTER": "otlp,console",
        "OTEL_SERVICE_NAME": "my-training",
        "OTEL_SDK_DISABLED": "false",
        "SUPERVISE_AGENT": "ipc:///somewhere",  # the demo may run under an agent itself
        "PATH": "/usr/bin",
    }
    env = agent_env(
        user,
        receiver="http://127.0.0.1:5000",
        faults_dir=tmp_path,
        user=TelemetryConfig.from_env(user),
    )
    assert "SUPERVISE_AGENT" not in env and "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    assert env["PATH"] == "/usr/bin" and env["OTEL_SERVICE_NAME"] == "my-training"
    assert env["SUPERVISE_DEMO_FAULTS"] == str(tmp_path)
    resolved = TelemetryConfig.from_env(env)
    assert resolved.traces.endpoint == "http://127.0.0.1:5000/v1/traces"
    assert resolved.metrics.endpoint == "http://127.0.0.1:5000/v1/metrics"
    assert resolved.traces.exporters == ("otlp", "console")
    assert resolved.service_name == "my-training"


def test_telemetry_is_on_for_the_agents_even_when_the_user_turned_it_off(tmp_path: Path) -> None:
    user = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none"}
    env = agent_env(
        user,
        receiver="http://127.0.0.1:1",
        faults_dir=tmp_path,
        user=TelemetryConfig.from_env(user),
    )
    assert TelemetryConfig.from_env(env).traces.exporters == ("otlp",)


def test_reference_workers_get_torchrun_variables_and_no_agent() -> None:
    base = {
        "SUPERVISE_AGENT": "ipc:///x",
        "SUPERVISE_DEMO_FAULTS": "/f",
        "OTEL_X": "1",
        "HOME": "/h",
    }
    env = reference_env(base, rank=2, world=3, port=29500)
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "3" and env["MASTER_PORT"] == "29500"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["LOCAL_RANK"] == "0"
    assert "SUPERVISE_AGENT" not in env and "SUPERVISE_DEMO_FAULTS" not in env
    assert "OTEL_X" not in env and env["HOME"] == "/h"
