"""Tracer and meter providers built from a ``TelemetryConfig``; the process-wide handle.

When nothing is configured the handle holds the OpenTelemetry API's no-op tracer and meter:
the SDK is not even imported, no thread is started, and recording costs one call.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import structlog
from opentelemetry import metrics, trace
from opentelemetry.util.types import AttributeValue

from supervise._version import __version__
from supervise.telemetry.config import TelemetryConfig, TelemetryError
from supervise.telemetry.metrics import LagSource, MemorySource, instruments_for
from supervise.telemetry.names import SCOPE, Attr

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

log = structlog.get_logger(__name__)


class _Exporter(Protocol):
    """What shutdown needs of an exporter: its loss count, and a way to stop it early."""

    undelivered: int

    def shutdown(self) -> None: ...


class Telemetry:
    """One process's (or, in tests, one simulated node's) tracer, meter and instruments."""

    def __init__(
        self,
        *,
        config: TelemetryConfig,
        rank: int | None,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        resource: Resource | None,
        exporters: Sequence[_Exporter] = (),
    ) -> None:
        self.config = config
        self.rank = rank
        self.resource = resource
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        version = __version__
        self.tracer: trace.Tracer = (
            trace.NoOpTracer()
            if tracer_provider is None
            else tracer_provider.get_tracer(SCOPE, version)
        )
        self.meter: metrics.Meter = (
            metrics.NoOpMeter(SCOPE)
            if meter_provider is None
            else meter_provider.get_meter(SCOPE, version)
        )
        self.metrics = instruments_for(self.meter)
        self._exporters = tuple(exporters)
        self._lock = threading.Lock()
        self._closed = False
        self._shutdown_ok = True
        if tracer_provider is not None or meter_provider is not None:
            # The SDK's own exit hook would wait out every retry against a dead collector.
            atexit.register(self.shutdown, _EXIT_TIMEOUT_S)

    @property
    def traces_enabled(self) -> bool:
        """Whether spans are recorded and exported."""
        return self.tracer_provider is not None

    @property
    def metrics_enabled(self) -> bool:
        """Whether metrics are recorded and exported."""
        return self.meter_provider is not None

    @property
    def undelivered(self) -> int:
        """Spans (and metric batches) the OTLP exporters failed to deliver so far."""
        return sum(e.undelivered for e in self._exporters)

    @classmethod
    def disabled(cls) -> Telemetry:
        """A handle that records nothing (what ``get_telemetry()`` gives before any setup)."""
        return cls(
            config=TelemetryConfig(),
            rank=None,
            tracer_provider=None,
            meter_provider=None,
            resource=None,
        )

    @classmethod
    def create(
        cls,
        config: TelemetryConfig | None = None,
        *,
        rank: int | None = None,
        span_processors: Sequence[SpanProcessor] = (),
        metric_readers: Sequence[MetricReader] = (),
        resource_attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Telemetry:
        """Build providers for ``config`` (default: from ``OTEL_*``).

        ``span_processors`` / ``metric_readers`` are added to what the config asks for and
        enable their signal on their own (tests use in-memory ones).
        """
        if config is None:
            config = TelemetryConfig.from_env()
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise TelemetryError(f"rank = {rank!r}: must be an integer >= 0")
        traces_on = config.traces.enabled or bool(span_processors)
        metrics_on = config.metrics.enabled or bool(metric_readers)
        if not (traces_on or metrics_on):
            return cls(
                config=config,
                rank=rank,
                tracer_provider=None,
                meter_provider=None,
                resource=None,
            )
        resource = _resource(config, rank, resource_attributes)
        exporters: list[_Exporter] = []
        tracer_provider = (
            _tracer_provider(config, resource, span_processors, exporters) if traces_on else None
        )
        meter_provider = (
            _meter_provider(config, resource, metric_readers, exporters) if metrics_on else None
        )
        return cls(
            config=config,
            rank=rank,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            resource=resource,
            exporters=exporters,
        )

    def register_lag_source(self, source: LagSource) -> Callable[[], None]:
        """Feed the ``supervise.replica.lag`` gauge; see ``Instruments.register_lag_source``."""
        return self.metrics.register_lag_source(source)

    def register_memory_source(self, kind: str, source: MemorySource) -> Callable[[], None]:
        """Feed the ``supervise.memory.held`` gauge; see ``Instruments.register_memory_source``."""
        return self.metrics.register_memory_source(kind, source)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything recorded so far. False if that did not finish within
        ``timeout_s`` or an export failed meanwhile."""
        tracer_provider, meter_provider = self.tracer_provider, self.meter_provider
        before = self.undelivered

        def flush() -> None:
            if tracer_provider is not None:
                tracer_provider.force_flush()
            if meter_provider is not None:
                meter_provider.force_flush()

        return _bounded(flush, timeout_s) and self.undelivered == before

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Flush, then stop the exporters and their threads, within ``timeout_s``.

        Past the timeout the exporters are stopped mid-retry (what was left is dropped), so
        an agent whose collector is down still exits in time. Returns False if anything was
        dropped or could not be delivered during this handle's life. Idempotent.
        """
        with self._lock:
            if self._closed:
                return self._shutdown_ok
            self._closed = True
        tracer_provider, meter_provider = self.tracer_provider, self.meter_provider
        if tracer_provider is None and meter_provider is None:
            return True

        def stop() -> None:
            if tracer_provider is not None:
                tracer_provider.force_flush()
                tracer_provider.shutdown()
            if meter_provider is not None:
                meter_provider.shutdown(timeout_millis=max(1.0, timeout_s * 1000))

        worker = _start(stop)
        worker.join(max(0.0, timeout_s))
        finished = not worker.is_alive()
        if not finished:
            for exporter in self._exporters:
                exporter.shutdown()  # interrupts the retry loop of an export in progress
            worker.join(_ABORT_GRACE_S)  # let the interrupted export count what it lost
            log.warning(
                "telemetry: export did not finish in time, the rest is dropped", timeout_s=timeout_s
            )
        lost = self.undelivered
        if lost:
            log.warning("telemetry: some spans or metrics were not delivered", undelivered=lost)
        self._shutdown_ok = finished and lost == 0
        with contextlib.suppress(Exception):
            atexit.unregister(self.shutdown)
        return self._shutdown_ok


_EXIT_TIMEOUT_S: Final = 5.0
_ABORT_GRACE_S: Final = 1.0


def _start(fn: Callable[[], None]) -> threading.Thread:
    worker = threading.Thread(target=fn, name="supervise-telemetry-flush", daemon=True)
    worker.start()
    return worker


def _bounded(fn: Callable[[], None], timeout_s: float) -> bool:
    """Run ``fn`` in a daemon thread; whether it finished within ``timeout_s`` (it may go on)."""
    worker = _start(fn)
    worker.join(max(0.0, timeout_s))
    return not worker.is_alive()


def _resource(
    config: TelemetryConfig, rank: int | None, extra: Mapping[str, AttributeValue] | None
) -> Resource:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, AttributeValue] = {
        "service.version": __version__,
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
    }
    if rank is not None:
        attributes[Attr.NODE_RANK] = rank
    attributes.update(extra or {})
    attributes.update(config.resource_attributes)  # the user's OTEL_RESOURCE_ATTRIBUTES win
    attributes["service.name"] = config.service_name
    return Resource.create(attributes)


def _tracer_provider(
    config: TelemetryConfig,
    resource: Resource,
    extra: Sequence[SpanProcessor],
    exporters: list[_Exporter],
) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    from supervise.telemetry._export import CountingSpanExporter, PrivateRandomIds

    provider = TracerProvider(
        resource=resource, shutdown_on_exit=False, id_generator=PrivateRandomIds()
    )
    for name in config.traces.exporters:
        if name == "otlp":
            exporter = CountingSpanExporter(
                endpoint=config.traces.endpoint, headers=dict(config.traces.headers) or None
            )
            exporters.append(exporter)
            provider.add_span_processor(BatchSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    for processor in extra:
        provider.add_span_processor(processor)
    return provider


def _meter_provider(
    config: TelemetryConfig,
    resource: Resource,
    extra: Sequence[MetricReader],
    exporters: list[_Exporter],
) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )

    from supervise.telemetry._export import CountingMetricExporter

    readers: list[MetricReader] = []
    for name in config.metrics.exporters:
        exporter: MetricExporter
        if name == "otlp":
            counting = CountingMetricExporter(
                endpoint=config.metrics.endpoint, headers=dict(config.metrics.headers) or None
            )
            exporters.append(counting)
            exporter = counting
        else:
            exporter = ConsoleMetricExporter()
        readers.append(
            PeriodicExportingMetricReader(
                exporter, export_interval_millis=config.metric_export_interval_s * 1000
            )
        )
    readers.extend(extra)
    return MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)


# --- the process-wide handle ---------------------------------------------------------------


class _Process:
    """The process-wide telemetry state (one per interpreter)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: Telemetry | None = None
        self.disabled: Telemetry | None = None
        self.globals_installed = False


_process = _Process()


def setup_telemetry(
    *, rank: int | None = None, environ: Mapping[str, str] | None = None, set_global: bool = True
) -> Telemetry:
    """Configure telemetry for this process from ``OTEL_*`` (off when none is set).

    Idempotent: later calls return the same handle (one naming a different ``rank`` is an
    error; call ``shutdown_telemetry()`` first). With ``set_global`` the providers also become
    OpenTelemetry's global ones, unless the application installed its own.
    """
    with _process.lock:
        current = _process.current
        if current is not None:
            if rank is not None and rank != current.rank:
                raise TelemetryError(
                    f"telemetry is already set up for rank {current.rank!r}, not {rank!r};"
                    " call shutdown_telemetry() first"
                )
            return current
        telemetry = Telemetry.create(TelemetryConfig.from_env(environ), rank=rank)
        if set_global:
            _install_globals(telemetry)
        _process.current = telemetry
        return telemetry


def get_telemetry() -> Telemetry:
    """The handle ``setup_telemetry`` made, or a no-op one if telemetry was never set up."""
    current = _process.current
    if current is not None:
        return current
    with _process.lock:
        if _process.disabled is None:
            _process.disabled = Telemetry.disabled()
        return _process.current or _process.disabled


def shutdown_telemetry(timeout_s: float = 10.0) -> bool:
    """Flush and stop the process's telemetry (the agent calls this at exit: no span lost).

    Returns False if an exporter did not finish within ``timeout_s``. Safe to call twice.
    """
    with _process.lock:
        telemetry, _process.current = _process.current, None
    if telemetry is None:
        return True
    return telemetry.shutdown(timeout_s)


def _install_globals(telemetry: Telemetry) -> None:
    """Make our providers OpenTelemetry's global ones, once per process, if nobody else did."""
    if _process.globals_installed:
        return
    if telemetry.tracer_provider is not None and isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider
    ):
        trace.set_tracer_provider(telemetry.tracer_provider)
        _process.globals_installed = True
    if telemetry.meter_provider is not None:
        metrics.set_meter_provider(telemetry.meter_provider)
        _process.globals_installed = True
