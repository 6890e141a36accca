"""integrations/otel: the otelcol config is well-formed and self-consistent; rotelctl.py
starts, reports and stops a real rotel (by PID) that logs or forwards what it receives."""

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from supervise._testing import OtlpSink
from supervise._testing.poll import wait_until
from supervise.telemetry import Telemetry, TelemetryConfig, snapshot_span

OTEL_DIR = Path(__file__).parents[2] / "integrations" / "otel"
ROTELCTL = OTEL_DIR / "rotelctl.py"
_COMPONENT_ID = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.-]+)?$")
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_ENV_REF = re.compile(r"^env:[A-Za-z_][A-Za-z0-9_]*(:-.*)?$")


@pytest.fixture(scope="module")
def otelcol() -> dict[str, object]:
    text = (OTEL_DIR / "otelcol.yaml").read_text()
    for ref in _PLACEHOLDER.findall(text):
        assert _ENV_REF.match(ref), f"malformed placeholder ${{{ref}}}"
    config = yaml.safe_load(text)
    assert isinstance(config, dict)
    return config


def test_otelcol_sections_and_component_ids(otelcol: dict[str, object]) -> None:
    assert set(otelcol) <= {
        "receivers",
        "processors",
        "exporters",
        "extensions",
        "connectors",
        "service",
    }
    for section in ("receivers", "processors", "exporters", "extensions"):
        components = otelcol[section]
        assert isinstance(components, dict) and components
        for component_id in components:
            assert _COMPONENT_ID.match(component_id), component_id


def test_otelcol_pipelines_use_only_defined_components(otelcol: dict[str, object]) -> None:
    service = otelcol["service"]
    assert set(service["pipelines"]) == {"traces", "metrics", "logs"}
    for name, pipeline in service["pipelines"].items():
        assert pipeline["receivers"] and pipeline["exporters"], name
        for kind in ("receivers", "processors", "exporters"):
            for component_id in pipeline.get(kind, []):
                assert component_id in otelcol[kind], f"{name}.{kind}: {component_id} undefined"
        processors = pipeline["processors"]
        assert processors[0] == "memory_limiter" and processors[-1] == "batch", name
    for extension in service["extensions"]:
        assert extension in otelcol["extensions"]


def test_otelcol_receives_otlp_on_loopback(otelcol: dict[str, object]) -> None:
    protocols = otelcol["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "127.0.0.1:4317"
    assert protocols["http"]["endpoint"] == "127.0.0.1:4318"
    assert otelcol["exporters"]["otlphttp/backend"]["endpoint"] == "${env:OTLP_BACKEND_ENDPOINT}"


def _ctl(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROTELCTL), "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """rotelctl's state dir; whatever rotel it recorded is killed by PID if a test failed."""
    state = tmp_path / "rotel-state"
    yield state
    recorded = state / "rotel.json"
    if recorded.exists():
        pid = json.loads(recorded.read_text())["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"rotel-agent" in cmdline.read_bytes():
            os.kill(pid, signal.SIGKILL)


def _send_capture_span(endpoint: str) -> None:
    tel = Telemetry.create(
        TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint + "/v1/traces"})
    )
    with snapshot_span("capture", telemetry=tel, bytes=77):
        pass
    assert tel.shutdown(timeout_s=30)


def _gone(pid: int) -> bool:
    cmdline = Path(f"/proc/{pid}/cmdline")
    stat = Path(f"/proc/{pid}/stat")
    try:
        return b"rotel-agent" not in cmdline.read_bytes() or ") Z" in stat.read_text()
    except OSError:
        return True


def test_rotelctl_start_logs_what_arrives_then_stops(state_dir: Path) -> None:
    started = _ctl(state_dir, "start", "--http-port", "0", "--grpc-port", "0")
    state = json.loads((state_dir / "rotel.json").read_text())
    assert f"export OTEL_EXPORTER_OTLP_ENDPOINT={state['http_endpoint']}" in started.stdout
    assert "rotel running" in _ctl(state_dir, "status").stdout
    again = _ctl(state_dir, "start", "--http-port", "0", "--grpc-port", "0", check=False)
    assert again.returncode == 1 and "already running" in again.stdout

    _send_capture_span(state["http_endpoint"])
    log = Path(state["log"])
    wait_until(
        lambda: "supervise.snapshot.capture" in log.read_text(errors="replace"),
        what="the capture span in rotel's log",
        timeout_s=30,
    )

    assert f"rotel stopped (pid {state['pid']})" in _ctl(state_dir, "stop").stdout
    assert _gone(state["pid"])
    assert not (state_dir / "rotel.json").exists()
    assert _ctl(state_dir, "status", check=False).returncode == 1
    assert "not running" in _ctl(state_dir, "stop").stdout


def test_rotelctl_forwards_otlp(state_dir: Path) -> None:
    with OtlpSink() as sink:
        _ctl(state_dir, "start", "--http-port", "0", "--grpc-port", "0", "--forward", sink.endpoint)
        state = json.loads((state_dir / "rotel.json").read_text())
        _send_capture_span(state["http_endpoint"])
        (span,) = sink.wait_for_spans(["supervise.snapshot.capture"])
        assert span.attributes["supervise.bytes"] == 77
        _ctl(state_dir, "stop")
        assert _gone(state["pid"])


def test_rotelctl_ignores_a_recycled_pid(state_dir: Path) -> None:
    state_dir.mkdir(parents=True)
    # a live process that is not rotel: our own pid
    (state_dir / "rotel.json").write_text(json.dumps({"pid": os.getpid(), "http_endpoint": "x"}))
    result = _ctl(state_dir, "stop")
    assert "is gone" in result.stdout
    assert not (state_dir / "rotel.json").exists()


def test_rotelctl_rejects_a_bad_port(state_dir: Path) -> None:
    result = _ctl(state_dir, "start", "--http-port", "70000", check=False)
    assert result.returncode == 2
    assert "must be in 0..65535" in result.stderr
