"""The demo's OTLP receiver passes every export on to the user's own collector."""

from __future__ import annotations

import http.client

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from supervise.telemetry.config import TelemetryConfig
from supervise.telemetry.forward import ForwardTarget, OtlpForwarder, forward_targets
from supervise.telemetry.receiver import OtlpSink


def _export(name: str) -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.name = name
    span.trace_id = bytes(range(16))
    span.span_id = bytes(range(8))
    return request.SerializeToString()


def _post(sink: OtlpSink, path: str, body: bytes) -> int:
    host, port = sink.endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/x-protobuf"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_every_export_reaches_the_users_collector_too() -> None:
    with OtlpSink() as users:
        target = ForwardTarget(users.endpoint + "/v1/traces", {"x-team": "ml"})
        forwarder = OtlpForwarder({"/v1/traces": target})
        with OtlpSink(forward=forwarder) as demo:
            assert _post(demo, "/v1/traces", _export("supervise.recovery")) == 200
            assert _post(demo, "/v1/traces", b"\xff\xff") == 400  # undecodable: not forwarded
            users.wait_for_spans(["supervise.recovery"], timeout_s=10)
        assert [s.name for s in demo.spans()] == ["supervise.recovery"]
        assert [s.name for s in users.spans()] == ["supervise.recovery"]
        assert forwarder.sent == 1 and not forwarder.errors


def test_an_unreachable_collector_is_an_error_not_a_hang() -> None:
    with OtlpSink() as gone:
        url = gone.endpoint + "/v1/traces"
    forwarder = OtlpForwarder({"/v1/traces": ForwardTarget(url)})
    with OtlpSink(forward=forwarder) as demo:
        assert _post(demo, "/v1/traces", _export("x")) == 200
    assert forwarder.sent == 0
    assert len(forwarder.errors) == 1 and url in forwarder.errors[0]


def test_targets_come_from_the_users_otel_settings() -> None:
    none = TelemetryConfig.from_env({})
    assert forward_targets(none) == {}
    config = TelemetryConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20t",
            "OTEL_METRICS_EXPORTER": "console",
        }
    )
    targets = forward_targets(config)
    assert set(targets) == {"/v1/traces"}  # metrics go to the console only: nothing to forward
    assert targets["/v1/traces"].url == "http://collector:4318/v1/traces"
    assert targets["/v1/traces"].headers == {"authorization": "Bearer t"}
