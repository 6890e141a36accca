"""A real OpenTelemetry collector for tests: rotel on loopback, forwarding to an ``OtlpSink``.

Spans a test (or a node agent it started) exports over OTLP/HTTP go through rotel's
receiver, batching and exporter before the test reads them, decoded, from the sink.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from supervise._testing.otlp_sink import OtlpSink, ReceivedMetric, ReceivedSpan
from supervise._testing.rotel import Rotel


class OtelCollector:
    """rotel receiving OTLP on free loopback ports; what it exported is in ``.sink``."""

    def __init__(self, log_dir: Path, *, batch_timeout: str = "50ms") -> None:
        self.log_dir = log_dir
        self.sink = OtlpSink()
        self._batch_timeout = batch_timeout
        self.rotel: Rotel | None = None

    def start(self) -> Self:
        """Start the sink, then rotel forwarding to it (stops the sink if rotel fails)."""
        self.sink.start()
        try:
            self.rotel = Rotel.forwarding_to(
                self.sink.endpoint,
                extra_args=("--batch-timeout", self._batch_timeout),
                log_path=self.log_dir / "rotel.log",
            ).start()
        except BaseException:
            self.sink.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop rotel (SIGTERM: it flushes to the sink first), then the sink."""
        try:
            if self.rotel is not None:
                self.rotel.stop()
        finally:
            self.sink.stop()

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
        """The value for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (rotel's OTLP/HTTP receiver)."""
        if self.rotel is None:
            raise RuntimeError("collector not started")
        return self.rotel.http_endpoint

    @property
    def pid(self) -> int | None:
        """rotel's PID while it runs."""
        return None if self.rotel is None else self.rotel.pid

    def env(self, *, metric_export_interval_ms: int = 60_000) -> dict[str, str]:
        """``OTEL_*`` variables that send a process's traces and metrics to this collector."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_METRIC_EXPORT_INTERVAL": str(metric_export_interval_ms),
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def spans(self, name: str | None = None, trace_id: str | None = None) -> list[ReceivedSpan]:
        """Spans that arrived so far (see ``OtlpSink.spans``)."""
        return self.sink.spans(name, trace_id)

    def metrics(self, name: str | None = None) -> list[ReceivedMetric]:
        """Metrics that arrived so far (see ``OtlpSink.metrics``)."""
        return self.sink.metrics(name)

    def wait_for_spans(
        self, names: Sequence[str], *, trace_id: str | None = None, timeout_s: float = 30.0
    ) -> list[ReceivedSpan]:
        """Block until the named spans arrived (see ``OtlpSink.wait_for_spans``); on timeout
        the error also quotes rotel's log."""
        try:
            return self.sink.wait_for_spans(names, trace_id=trace_id, timeout_s=timeout_s)
        except TimeoutError as exc:
            tail = "(not started)" if self.rotel is None else self.rotel.log_tail()
            raise TimeoutError(f"{exc}; rotel log: {tail}") from None

    async def wait_for_spans_async(
        self, names: Sequence[str], *, trace_id: str | None = None, timeout_s: float = 30.0
    ) -> list[ReceivedSpan]:
        """``wait_for_spans`` from a trio task, without blocking the event loop."""
        import trio

        call: Callable[[], list[ReceivedSpan]] = functools.partial(
            self.wait_for_spans, names, trace_id=trace_id, timeout_s=timeout_s
        )
        return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
