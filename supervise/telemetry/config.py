"""Telemetry configuration resolved from the standard ``OTEL_*`` environment variables.

Off unless asked for: no exporter variable and no endpoint variable means no tracing and no
metrics (no-op API objects, no threads). Every malformed variable is a one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

import attrs

from supervise.telemetry.names import SERVICE_NAME

Signal = Literal["traces", "metrics"]
ExporterName = Literal["otlp", "console"]

_EXPORTERS: Final[frozenset[str]] = frozenset({"otlp", "console", "none"})
_DEFAULT_BASE: Final = "http://localhost:4318"
_PATHS: Final[dict[Signal, str]] = {"traces": "v1/traces", "metrics": "v1/metrics"}
_HTTP_PROTOBUF: Final = "http/protobuf"


class TelemetryError(ValueError):
    """A telemetry setting or call was wrong; the message names what and what is allowed."""


def _frozen_mapping(mapping: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping))


@attrs.frozen(slots=True)
class SignalConfig:
    """Where one signal (traces or metrics) goes: exporters, OTLP endpoint and headers."""

    exporters: tuple[ExporterName, ...] = ()
    endpoint: str | None = None
    headers: Mapping[str, str] = attrs.field(
        factory=lambda: MappingProxyType({}), converter=_frozen_mapping
    )

    @property
    def enabled(self) -> bool:
        """Whether anything is exported for this signal."""
        return bool(self.exporters)


@attrs.frozen(slots=True)
class TelemetryConfig:
    """The resolved telemetry settings; ``TelemetryConfig.from_env()`` reads ``OTEL_*``."""

    traces: SignalConfig = SignalConfig()
    metrics: SignalConfig = SignalConfig()
    service_name: str = SERVICE_NAME
    resource_attributes: Mapping[str, str] = attrs.field(
        factory=lambda: MappingProxyType({}), converter=_frozen_mapping
    )
    metric_export_interval_s: float = 60.0

    @property
    def enabled(self) -> bool:
        """Whether any signal is exported."""
        return self.traces.enabled or self.metrics.enabled

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelemetryConfig:
        """Resolve the settings from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        attributes = _resource_attributes(env)
        if _flag(env, "OTEL_SDK_DISABLED"):
            return cls(service_name=_service_name(env, attributes), resource_attributes=attributes)
        return cls(
            traces=_signal(env, "traces"),
            metrics=_signal(env, "metrics"),
            service_name=_service_name(env, attributes),
            resource_attributes=attributes,
            metric_export_interval_s=_interval_s(env, "OTEL_METRIC_EXPORT_INTERVAL", 60.0),
        )


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = _get(env, name)
    if value is None or value.lower() == "false":
        return False
    if value.lower() == "true":
        return True
    raise TelemetryError(f"{name}={value!r}: must be 'true' or 'false'")


def _signal(env: Mapping[str, str], signal: Signal) -> SignalConfig:
    upper = signal.upper()
    exporter_var = f"OTEL_{upper}_EXPORTER"
    endpoint_var = f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT"
    signal_endpoint = _get(env, endpoint_var)
    base_endpoint = _get(env, "OTEL_EXPORTER_OTLP_ENDPOINT")

    raw = _get(env, exporter_var)
    if raw is None:
        # Off unless an endpoint says where to send: never export to a default address unasked.
        names: tuple[str, ...] = ("otlp",) if (signal_endpoint or base_endpoint) else ()
    else:
        names = tuple(n.strip().lower() for n in raw.split(",") if n.strip())
        unknown = [n for n in names if n not in _EXPORTERS]
        if unknown:
            raise TelemetryError(
                f"{exporter_var}={raw!r}: unsupported exporter {unknown[0]!r};"
                " supervise supports 'otlp' (HTTP/protobuf), 'console' and 'none'"
            )
        if "none" in names:
            if len(names) > 1:
                raise TelemetryError(f"{exporter_var}={raw!r}: 'none' cannot be combined")
            names = ()
    exporters: tuple[ExporterName, ...] = tuple(
        "otlp" if n == "otlp" else "console" for n in dict.fromkeys(names)
    )
    if "otlp" not in exporters:
        return SignalConfig(exporters=exporters)

    for var in (f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = _get(env, var)
        if protocol is not None:
            if protocol != _HTTP_PROTOBUF:
                raise TelemetryError(
                    f"{var}={protocol!r}: supervise exports OTLP over HTTP/protobuf only;"
                    f" set it to {_HTTP_PROTOBUF!r} and point the endpoint at the collector's"
                    " HTTP port (usually 4318)"
                )
            break

    if signal_endpoint is not None:
        endpoint = _check_url(endpoint_var, signal_endpoint)
    else:
        base = _DEFAULT_BASE if base_endpoint is None else base_endpoint
        _check_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)
        endpoint = base.rstrip("/") + "/" + _PATHS[signal]

    headers = dict(_headers(env, "OTEL_EXPORTER_OTLP_HEADERS"))
    headers.update(_headers(env, f"OTEL_EXPORTER_OTLP_{upper}_HEADERS"))
    return SignalConfig(exporters=exporters, endpoint=endpoint, headers=MappingProxyType(headers))


def _check_url(var: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise TelemetryError(f"{var}={url!r}: must be an http:// or https:// URL with a host")
    try:
        _ = parts.port
    except ValueError:
        raise TelemetryError(f"{var}={url!r}: the port is not a number in 0..65535") from None
    return url


def _pairs(env: Mapping[str, str], var: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` (W3C baggage style, values percent-decoded)."""
    raw = _get(env, var)
    if raw is None:
        return {}
    out: dict[str, str] = {}
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TelemetryError(f"{var}: {item.strip()!r} is not a key=value pair")
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def _headers(env: Mapping[str, str], var: str) -> dict[str, str]:
    return {k.lower(): v for k, v in _pairs(env, var).items()}


def _resource_attributes(env: Mapping[str, str]) -> dict[str, str]:
    return _pairs(env, "OTEL_RESOURCE_ATTRIBUTES")


def _service_name(env: Mapping[str, str], attributes: Mapping[str, str]) -> str:
    return _get(env, "OTEL_SERVICE_NAME") or attributes.get("service.name") or SERVICE_NAME


def _interval_s(env: Mapping[str, str], var: str, default_s: float) -> float:
    raw = _get(env, var)
    if raw is None:
        return default_s
    try:
        millis = int(raw)
    except ValueError:
        raise TelemetryError(f"{var}={raw!r}: must be a whole number of milliseconds") from None
    if millis <= 0:
        raise TelemetryError(f"{var}={raw!r}: must be > 0 milliseconds")
    return millis / 1000.0
