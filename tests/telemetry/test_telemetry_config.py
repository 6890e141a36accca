"""OTEL_* environment variables -> TelemetryConfig: off unless asked, standard precedence,
one-line errors for everything malformed."""

import pytest

from supervise.telemetry import TelemetryConfig, TelemetryError


def test_nothing_set_is_off() -> None:
    config = TelemetryConfig.from_env({})
    assert not config.enabled
    assert config.traces.exporters == () and config.metrics.exporters == ()
    assert config.service_name == "supervise"


def test_unrelated_otel_variables_do_not_turn_it_on() -> None:
    config = TelemetryConfig.from_env(
        {"OTEL_SERVICE_NAME": "trainer", "OTEL_RESOURCE_ATTRIBUTES": "team=ml"}
    )
    assert not config.enabled
    assert config.service_name == "trainer"


def test_base_endpoint_enables_both_signals_with_signal_paths() -> None:
    config = TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"})
    assert config.traces.exporters == ("otlp",)
    assert config.traces.endpoint == "http://127.0.0.1:4318/v1/traces"
    assert config.metrics.endpoint == "http://127.0.0.1:4318/v1/metrics"


def test_signal_endpoint_is_used_verbatim_and_enables_only_that_signal() -> None:
    config = TelemetryConfig.from_env(
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector:9999/custom/path"}
    )
    assert config.traces.endpoint == "https://collector:9999/custom/path"
    assert not config.metrics.enabled


def test_signal_endpoint_overrides_base() -> None:
    config = TelemetryConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://b:4318/v1/metrics",
        }
    )
    assert config.traces.endpoint == "http://a:4318/v1/traces"
    assert config.metrics.endpoint == "http://b:4318/v1/metrics"


def test_exporter_none_turns_a_signal_off() -> None:
    config = TelemetryConfig.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318", "OTEL_METRICS_EXPORTER": "none"}
    )
    assert config.traces.enabled and not config.metrics.enabled


def test_explicit_otlp_exporter_uses_the_spec_default_endpoint() -> None:
    config = TelemetryConfig.from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert config.traces.endpoint == "http://localhost:4318/v1/traces"
    assert not config.metrics.enabled


def test_console_and_otlp_together() -> None:
    config = TelemetryConfig.from_env({"OTEL_TRACES_EXPORTER": "console, otlp,console"})
    assert config.traces.exporters == ("console", "otlp")


def test_sdk_disabled_wins_over_everything() -> None:
    config = TelemetryConfig.from_env(
        {
            "OTEL_SDK_DISABLED": "TRUE",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
            "OTEL_TRACES_EXPORTER": "otlp",
        }
    )
    assert not config.enabled


def test_sdk_disabled_false_is_not_disabled() -> None:
    config = TelemetryConfig.from_env(
        {"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318"}
    )
    assert config.enabled


def test_headers_are_merged_signal_specific_winning() -> None:
    config = TelemetryConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
            "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-team=ml",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-team=infra",
        }
    )
    assert dict(config.traces.headers) == {"authorization": "Bearer abc", "x-team": "infra"}
    assert dict(config.metrics.headers) == {"authorization": "Bearer abc", "x-team": "ml"}


def test_service_name_precedence() -> None:
    from_attrs = TelemetryConfig.from_env({"OTEL_RESOURCE_ATTRIBUTES": "service.name=a,k=v%2Cw"})
    assert from_attrs.service_name == "a"
    assert dict(from_attrs.resource_attributes) == {"service.name": "a", "k": "v,w"}
    both = TelemetryConfig.from_env(
        {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "b"}
    )
    assert both.service_name == "b"


def test_metric_export_interval() -> None:
    config = TelemetryConfig.from_env({"OTEL_METRIC_EXPORT_INTERVAL": "2500"})
    assert config.metric_export_interval_s == 2.5


def test_http_protobuf_protocol_is_accepted() -> None:
    config = TelemetryConfig.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    )
    assert config.traces.enabled


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_SDK_DISABLED": "yes"}, r"OTEL_SDK_DISABLED='yes': must be 'true' or 'false'"),
        (
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            r"OTEL_TRACES_EXPORTER='zipkin': unsupported exporter",
        ),
        ({"OTEL_METRICS_EXPORTER": "prometheus"}, r"OTEL_METRICS_EXPORTER='prometheus'"),
        ({"OTEL_TRACES_EXPORTER": "none,otlp"}, r"'none' cannot be combined"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            r"OTEL_EXPORTER_OTLP_PROTOCOL='grpc': supervise exports OTLP over HTTP/protobuf only",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json",
            },
            r"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json'",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"}, r"must be an http:// or https:// URL"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:99999"}, r"the port is not a number"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://a/v1/traces"},
            r"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT='ftp://a/v1/traces'",
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
                "OTEL_EXPORTER_OTLP_HEADERS": "novalue",
            },
            r"OTEL_EXPORTER_OTLP_HEADERS: 'novalue' is not a key=value pair",
        ),
        ({"OTEL_RESOURCE_ATTRIBUTES": "=x"}, r"OTEL_RESOURCE_ATTRIBUTES: '=x'"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "1s"}, r"whole number of milliseconds"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "0"}, r"must be > 0"),
    ],
)
def test_malformed_variables_are_one_line_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(TelemetryError, match=message) as info:
        TelemetryConfig.from_env(env)
    assert "\n" not in str(info.value)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://h:1/v1/traces")
    assert TelemetryConfig.from_env().traces.endpoint == "http://h:1/v1/traces"
