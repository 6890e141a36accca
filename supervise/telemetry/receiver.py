"""An OTLP/HTTP receiver on loopback that decodes and keeps what it is sent.

`supervise demo` runs one to build its recovery timeline from the agents' spans (optionally
passing every export on to the user's own collector); tests run one behind a real collector
(rotel) to check what arrived: span names, ids, parents, events, attributes, metrics.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self

import attrs
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from supervise.telemetry.forward import OtlpForwarder

_ROUTES: Final[dict[str, tuple[type[Message], type[Message]]]] = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
}
_MAX_BODY: Final = 64 * 1024 * 1024

Value = str | bool | int | float | bytes | tuple["Value", ...] | Mapping[str, "Value"] | None


def decode_value(value: AnyValue) -> Value:
    """An OTLP ``AnyValue`` as a plain Python value."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return tuple(decode_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return decode_attributes(value.kvlist_value.values)
    decoded: Value = getattr(value, which)
    return decoded


def decode_attributes(pairs: Sequence[KeyValue]) -> dict[str, Value]:
    """OTLP attributes (``KeyValue`` list) as a dict."""
    return {kv.key: decode_value(kv.value) for kv in pairs}


@attrs.frozen(slots=True)
class ReceivedEvent:
    """A span event as the collector received it."""

    name: str
    time_unix_nano: int
    attributes: Mapping[str, Value]


@attrs.frozen(slots=True)
class ReceivedSpan:
    """A span as the collector received it (ids as lowercase hex; ``parent_span_id`` "" = root)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_unix_nano: int
    end_unix_nano: int
    attributes: Mapping[str, Value]
    events: tuple[ReceivedEvent, ...]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    resource: Mapping[str, Value]
    scope: str

    @property
    def is_root(self) -> bool:
        """Whether the span has no parent."""
        return not self.parent_span_id

    @property
    def event_names(self) -> list[str]:
        """The names of its events, in the order recorded."""
        return [e.name for e in sorted(self.events, key=lambda e: e.time_unix_nano)]


@attrs.frozen(slots=True)
class ReceivedPoint:
    """One data point: ``value`` for sums and gauges; count/sum/buckets for histograms."""

    attributes: Mapping[str, Value]
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()


@attrs.frozen(slots=True)
class ReceivedMetric:
    """A metric as the collector received it."""

    name: str
    unit: str
    description: str
    kind: str  # sum, gauge, histogram, exponential_histogram, summary
    points: tuple[ReceivedPoint, ...]
    resource: Mapping[str, Value]
    scope: str


def _points(metric: Any) -> tuple[str, tuple[ReceivedPoint, ...]]:
    kind = metric.WhichOneof("data") or ""
    points: list[ReceivedPoint] = []
    if kind in {"sum", "gauge"}:
        for p in getattr(metric, kind).data_points:
            number = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
            points.append(ReceivedPoint(decode_attributes(p.attributes), value=float(number)))
    elif kind == "histogram":
        for p in metric.histogram.data_points:
            points.append(
                ReceivedPoint(
                    decode_attributes(p.attributes),
                    count=p.count,
                    sum=p.sum,
                    bucket_counts=tuple(p.bucket_counts),
                    explicit_bounds=tuple(p.explicit_bounds),
                )
            )
    return kind, tuple(points)


class OtlpSink:
    """A threaded OTLP/HTTP (protobuf) receiver on loopback that keeps what it decodes."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, forward: OtlpForwarder | None = None
    ) -> None:
        self._host = host
        self._forward = forward
        self._port = port
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._metrics: list[ReceivedMetric] = []
        self._log_records = 0
        self._errors: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --

    def start(self) -> Self:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), _Handler)
        server.owner = self
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        if self._forward is not None:
            self._forward.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (after forwarding what is queued, if any)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._forward is not None:
            self._forward.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The base URL to export OTLP/HTTP to."""
        return f"http://{self._host}:{self._port}"

    # -- what arrived --

    def spans(self, name: str | None = None, trace_id: str | None = None) -> list[ReceivedSpan]:
        """Spans received so far, optionally only those with ``name`` / in ``trace_id``."""
        with self._cond:
            found = list(self._spans)
        return [
            s
            for s in found
            if (name is None or s.name == name) and (trace_id is None or s.trace_id == trace_id)
        ]

    def metrics(self, name: str | None = None) -> list[ReceivedMetric]:
        """Metrics received so far (one entry per export), optionally only ``name``."""
        with self._cond:
            found = list(self._metrics)
        return [m for m in found if name is None or m.name == name]

    @property
    def log_records(self) -> int:
        """How many OTLP log records arrived."""
        with self._cond:
            return self._log_records

    @property
    def errors(self) -> list[str]:
        """Requests that could not be decoded (a healthy run has none)."""
        with self._cond:
            return list(self._errors)

    def clear(self) -> None:
        """Forget everything received so far."""
        with self._cond:
            self._spans.clear()
            self._metrics.clear()
            self._errors.clear()
            self._log_records = 0

    def wait_for(self, condition: Callable[[OtlpSink], bool], timeout_s: float = 30.0) -> None:
        """Block until ``condition(self)`` holds; TimeoutError (with what did arrive) if not."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if condition(self):
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.5))
        names = sorted({s.name for s in self.spans()})
        metric_names = sorted({m.name for m in self.metrics()})
        raise TimeoutError(
            f"collector did not receive what was expected within {timeout_s:g} s;"
            f" spans so far: {names}; metrics so far: {metric_names}; errors: {self.errors}"
        )

    def wait_for_spans(
        self,
        names: Sequence[str],
        *,
        trace_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> list[ReceivedSpan]:
        """Wait until every name in ``names`` arrived (as often as listed); the matching spans."""
        wanted: dict[str, int] = {}
        for n in names:
            wanted[n] = wanted.get(n, 0) + 1

        def arrived(sink: OtlpSink) -> bool:
            got = sink.spans(trace_id=trace_id)
            return all(sum(1 for s in got if s.name == n) >= k for n, k in wanted.items())

        self.wait_for(arrived, timeout_s)
        return [s for s in self.spans(trace_id=trace_id) if s.name in wanted]

    # -- decoding (called by the handler threads) --

    def _receive(self, path: str, body: bytes) -> tuple[int, bytes]:
        route = _ROUTES.get(path)
        if route is None:
            return 404, b""
        request_type, response_type = route
        request = request_type()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            self._error(f"{path}: undecodable protobuf ({exc})")
            return 400, b""
        if isinstance(request, ExportTraceServiceRequest):
            self._add_spans(request)
        elif isinstance(request, ExportMetricsServiceRequest):
            self._add_metrics(request)
        elif isinstance(request, ExportLogsServiceRequest):
            count = sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
            with self._cond:
                self._log_records += count
                self._cond.notify_all()
        if self._forward is not None:
            self._forward.submit(path, body)
        return 200, response_type().SerializeToString()

    def _error(self, message: str) -> None:
        with self._cond:
            self._errors.append(message)
            self._cond.notify_all()

    def _add_spans(self, request: ExportTraceServiceRequest) -> None:
        spans: list[ReceivedSpan] = []
        for rs in request.resource_spans:
            resource = decode_attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            start_unix_nano=s.start_time_unix_nano,
                            end_unix_nano=s.end_time_unix_nano,
                            attributes=decode_attributes(s.attributes),
                            events=tuple(
                                ReceivedEvent(
                                    e.name, e.time_unix_nano, decode_attributes(e.attributes)
                                )
                                for e in s.events
                            ),
                            status_code=s.status.code,
                            status_message=s.status.message,
                            resource=resource,
                            scope=ss.scope.name,
                        )
                    )
        with self._cond:
            self._spans.extend(spans)
            self._cond.notify_all()

    def _add_metrics(self, request: ExportMetricsServiceRequest) -> None:
        metrics: list[ReceivedMetric] = []
        for rm in request.resource_metrics:
            resource = decode_attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind, points = _points(m)
                    metrics.append(
                        ReceivedMetric(
                            m.name, m.unit, m.description, kind, points, resource, sm.scope.name
                        )
                    )
        with self._cond:
            self._metrics.extend(metrics)
            self._cond.notify_all()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: OtlpSink


class _Handler(http.server.BaseHTTPRequestHandler):
    """Decodes one OTLP/HTTP export per POST (protobuf; gzip or deflate bodies)."""

    server: _Server
    protocol_version = "HTTP/1.1"

    @property
    def owner(self) -> OtlpSink:
        return self.server.owner

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._reply(413, b"")
            return
        body = self.rfile.read(length)
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in {"", "identity"}:
                self.owner._error(f"{self.path}: unsupported Content-Encoding {encoding!r}")
                self._reply(415, b"")
                return
        except (OSError, zlib.error, EOFError) as exc:
            self.owner._error(f"{self.path}: corrupt {encoding} body ({exc})")
            self._reply(400, b"")
            return
        if ctype != "application/x-protobuf":
            self.owner._error(f"{self.path}: unsupported Content-Type {ctype!r}")
            self._reply(415, b"")
            return
        status, payload = self.owner._receive(self.path, body)
        self._reply(status, payload)

    def _reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what arrived, not an access log."""
