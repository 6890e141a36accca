"""A real collector: rotel on loopback, started by the project's own code. The spans of a
recovery across two processes (joined by inject/extract) must ARRIVE there with the contract
names, parents, events, attributes and resources; so must the metrics; log lines carry the
same ids. rotel is stopped by PID; a missing binary fails, it never skips."""

import gzip
import http.client
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from supervise._testing import OtelCollector, OtlpSink
from supervise._testing.rotel import ROTEL_AGENT_ENV, Rotel, RotelError, find_rotel_agent
from supervise.telemetry import (
    RECOVERY_SPAN,
    Attr,
    Metric,
    Phase,
    RecoveryTrace,
    setup_telemetry,
    shutdown_telemetry,
)

PEER = Path(__file__).with_name("peer_node.py")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_recovery_across_two_processes_arrives_at_rotel(otel_env: OtelCollector) -> None:
    setup_telemetry(rank=0)  # reads OTEL_* that otel_env put in the environment
    rt = RecoveryTrace.begin("peer_lost", rank=0)
    with rt.phase("detect", peer_rank=1):
        pass
    rt.event("detected", peer_rank=1)
    rt.event("started")
    with rt.phase("select_checkpoint"):
        pass
    rt.set(snapshot_version=40, snapshot_step=40)
    rt.event("checkpoint_selected", snapshot_version=40, snapshot_step=40)

    with trio.fail_after(120):
        peer = await trio.run_process(
            [sys.executable, str(PEER), json.dumps(rt.inject())],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert peer.returncode == 0, peer.stderr.decode()

    with rt.phase("restore", snapshot_source="local", bytes=8192):
        pass
    rt.event("restored")
    with rt.phase("resume"):
        pass
    rt.end("completed")
    assert shutdown_telemetry(timeout_s=30)

    expected = [RECOVERY_SPAN] + [
        p.span_name for p in (Phase.DETECT, Phase.SELECT_CHECKPOINT, Phase.RESTORE, Phase.RESUME)
    ]
    expected += [p.span_name for p in (Phase.FETCH, Phase.RESTORE, Phase.RESUME)]
    spans = await otel_env.wait_for_spans_async(expected, trace_id=rt.trace_id)
    assert sorted(s.name for s in spans) == sorted(expected)
    assert otel_env.sink.errors == []

    (root,) = [s for s in spans if s.name == RECOVERY_SPAN]
    assert root.is_root
    assert root.resource[Attr.NODE_RANK] == 0
    assert root.resource["service.name"] == "supervise"
    assert root.event_names == [
        "detected",
        "started",
        "checkpoint_selected",
        "restored",
        "completed",
    ]
    selected = next(e for e in root.events if e.name == "checkpoint_selected")
    assert selected.attributes == {Attr.SNAPSHOT_VERSION: 40, Attr.SNAPSHOT_STEP: 40}
    assert root.attributes[Attr.TRIGGER] == "peer_lost"
    assert root.attributes[Attr.SNAPSHOT_VERSION] == 40
    assert root.attributes[Attr.ATTEMPT] == 1
    assert root.status_code == 1  # OK

    phases = [s for s in spans if s.name != RECOVERY_SPAN]
    assert {s.parent_span_id for s in phases} == {root.span_id}
    by_rank: dict[object, list[str]] = {}
    for s in sorted(phases, key=lambda s: s.start_unix_nano):
        assert s.attributes[Attr.NODE_RANK] == s.resource[Attr.NODE_RANK]
        assert s.attributes[Attr.TRIGGER] == "peer_lost"
        by_rank.setdefault(s.resource[Attr.NODE_RANK], []).append(s.name.rsplit(".", 1)[1])
    assert by_rank == {
        0: ["detect", "select_checkpoint", "restore", "resume"],
        1: ["fetch", "restore", "resume"],
    }
    pids = {s.resource["process.pid"] for s in spans}
    assert len(pids) == 2 and os.getpid() in pids
    (fetch,) = [s for s in phases if s.name == Phase.FETCH.span_name]
    assert fetch.attributes[Attr.SNAPSHOT_SOURCE] == "peer"
    assert fetch.attributes[Attr.BYTES] == 4096
    assert fetch.attributes[Attr.SNAPSHOT_VERSION] == 40

    # the peer's log lines carry the ids of the spans that arrived
    lines = [json.loads(line) for line in peer.stderr.decode().splitlines() if line.startswith("{")]
    fetching = next(line for line in lines if line["event"] == "fetching shard")
    assert fetching["trace_id"] == rt.trace_id
    assert fetching["span_id"] == fetch.span_id
    (peer_resume,) = [
        s for s in phases if s.name == Phase.RESUME.span_name and s.resource[Attr.NODE_RANK] == 1
    ]
    stepped = next(line for line in lines if line["event"] == "first step completed")
    assert stepped["span_id"] == peer_resume.span_id

    # metrics of both processes went through the collector too (cumulative: the last export
    # of each process holds its totals)
    def io_points(sink: OtlpSink) -> dict[tuple[object, object], float | None]:
        return {
            (m.resource[Attr.NODE_RANK], p.attributes[Attr.OPERATION]): p.value
            for m in sink.metrics(Metric.SNAPSHOT_IO.name)
            for p in m.points
        }

    def both_arrived(sink: OtlpSink) -> bool:
        return {(1, "fetch"), (0, "restore")} <= set(io_points(sink))

    await trio.to_thread.run_sync(otel_env.sink.wait_for, both_arrived, 30.0)
    fetched = io_points(otel_env.sink)
    assert fetched[(1, "fetch")] == 4096
    assert fetched[(0, "restore")] == 8192
    assert {m.unit for m in otel_env.metrics(Metric.SNAPSHOT_IO.name)} == {"By"}
    durations = otel_env.metrics(Metric.PHASE_DURATION.name)
    assert {m.resource[Attr.NODE_RANK] for m in durations} == {0, 1}
    assert {m.unit for m in durations} == {"s"}


def test_collector_stops_rotel_by_pid(tmp_path: Path) -> None:
    collector = OtelCollector(tmp_path)
    with collector:
        pid = collector.pid
        assert pid is not None and _pid_alive(pid)
        endpoint = collector.endpoint
    assert not _pid_alive(pid)
    host, port = endpoint.removeprefix("http://").split(":")
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=1).close()


def test_rotel_that_cannot_bind_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        rotel = Rotel(grpc_port=taken, http_port=taken, log_path=tmp_path / "rotel.log")
        with pytest.raises(RotelError, match="rotel-agent exited with code") as info:
            rotel.start(timeout_s=20)
    assert "\n" not in str(info.value)
    assert rotel.pid is None


def test_an_interrupted_start_leaves_no_rotel_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or any error) while waiting for rotel to come up stops it by PID."""
    from supervise._testing import rotel as rotel_module

    rotel = Rotel(log_path=tmp_path / "rotel.log")
    started: list[int] = []

    def interrupted(host: str, port: int) -> bool:
        assert rotel.pid is not None
        started.append(rotel.pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(rotel_module, "_otlp_http_ready", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            rotel.start(timeout_s=20)
        assert rotel.pid is None
        assert started and not _pid_alive(started[0])
    finally:
        for pid in started:  # only rotel-agent processes this test started
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists() and b"rotel-agent" in cmdline.read_bytes():
                os.kill(pid, 9)


def test_missing_binary_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROTEL_AGENT_ENV, "/nonexistent/rotel-agent")
    with pytest.raises(RotelError, match="SUPERVISE_ROTEL_AGENT='/nonexistent/rotel-agent'"):
        find_rotel_agent()
    monkeypatch.delenv(ROTEL_AGENT_ENV)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RotelError, match=r"rotel-agent not found: install the dev extra"):
        find_rotel_agent()


def test_the_installed_rotel_is_found() -> None:
    agent = find_rotel_agent()
    assert agent.name == "rotel-agent" and os.access(agent, os.X_OK)


def _post(sink: OtlpSink, path: str, body: bytes, headers: dict[str, str]) -> int:
    host, port = sink.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_sink_decodes_gzip_and_rejects_garbage() -> None:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.name = "x"
    span.trace_id = bytes(range(16))
    span.span_id = bytes(range(8))
    attr = span.attributes.add()
    attr.key = "k"
    attr.value.array_value.values.add().int_value = 5
    proto = {"Content-Type": "application/x-protobuf"}
    with OtlpSink() as sink:
        body = gzip.compress(request.SerializeToString())
        assert _post(sink, "/v1/traces", body, {**proto, "Content-Encoding": "gzip"}) == 200
        assert _post(sink, "/v1/traces", b"\xff\xff\xff", proto) == 400
        assert _post(sink, "/v1/traces", b"{}", {"Content-Type": "application/json"}) == 415
        assert _post(sink, "/v1/nope", b"", proto) == 404
        (got,) = sink.spans()
        assert got.name == "x"
        assert got.trace_id == bytes(range(16)).hex()
        assert got.is_root
        assert got.attributes == {"k": (5,)}
        assert len(sink.errors) == 2
        with pytest.raises(TimeoutError, match=r"spans so far: \['x'\]"):
            sink.wait_for_spans(["y"], timeout_s=0.2)


def test_collector_timeout_names_what_arrived_and_quotes_rotel(tmp_path: Path) -> None:
    with OtelCollector(tmp_path) as collector:
        with pytest.raises(TimeoutError, match=r"spans so far: \[\].*rotel log: .*Starting Rotel"):
            collector.wait_for_spans(["supervise.recovery"], timeout_s=0.2)
