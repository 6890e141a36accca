"""The metric instruments (one set per meter) and the memory-held gauge's sources."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

import structlog
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation
from opentelemetry.util.types import AttributeValue

from supervise.telemetry.names import (
    DURATION_BUCKETS_S,
    THROUGHPUT_BUCKETS,
    Attr,
    Instrument,
    Metric,
)

log = structlog.get_logger(__name__)

MemorySource = Callable[[], int]
#: Steps each rank's replicas trail its newest local snapshot (rank -> steps).
LagSource = Callable[[], Mapping[int, int]]
Attributes = Mapping[str, AttributeValue]


class Instruments:
    """Every instrument of ``Metric``, created on one meter; a no-op meter makes them free."""

    def __init__(self, meter: Meter) -> None:
        self.recovery_duration = _histogram(meter, Metric.RECOVERY_DURATION, DURATION_BUCKETS_S)
        self.phase_duration = _histogram(meter, Metric.PHASE_DURATION, DURATION_BUCKETS_S)
        self.recoveries = _counter(meter, Metric.RECOVERIES)
        self.snapshot_duration = _histogram(meter, Metric.SNAPSHOT_DURATION, DURATION_BUCKETS_S)
        self.snapshot_io = _counter(meter, Metric.SNAPSHOT_IO)
        self.snapshot_throughput = _histogram(meter, Metric.SNAPSHOT_THROUGHPUT, THROUGHPUT_BUCKETS)
        self.training_steps = _counter(meter, Metric.TRAINING_STEPS)
        self.late_replies = _counter(meter, Metric.LATE_REPLIES)
        self.refused = _counter(meter, Metric.REFUSED)
        self.recoveries_held = _counter(meter, Metric.RECOVERIES_HELD)
        self._lock = threading.Lock()
        self._sources: dict[int, tuple[str, MemorySource]] = {}
        self._next_token = 0
        self.memory_held = meter.create_observable_gauge(
            Metric.MEMORY_HELD.name,
            callbacks=[self._observe_memory],
            unit=Metric.MEMORY_HELD.unit,
            description=Metric.MEMORY_HELD.description,
        )
        self._lag_sources: dict[int, LagSource] = {}
        self.replica_lag = meter.create_observable_gauge(
            Metric.REPLICA_LAG.name,
            callbacks=[self._observe_lag],
            unit=Metric.REPLICA_LAG.unit,
            description=Metric.REPLICA_LAG.description,
        )

    def record_transfer(
        self, operation: str, nbytes: int, seconds: float, attributes: Attributes | None = None
    ) -> None:
        """Count ``nbytes`` moved by ``operation`` and, when timed, its throughput."""
        attrs = {**(attributes or {}), Attr.OPERATION: operation}
        self.snapshot_io.add(nbytes, attrs)
        if seconds > 0 and nbytes > 0:
            self.snapshot_throughput.record(nbytes / seconds, attrs)

    def register_memory_source(self, kind: str, source: MemorySource) -> Callable[[], None]:
        """Report ``source()`` bytes as memory held of ``kind``; returns the unregister function.

        Sources are read on the metric export thread: they must be cheap and thread-safe
        (return a counter, do no I/O). Several sources of one kind are summed.
        """
        if not kind:
            raise ValueError("memory source kind must be a non-empty string")
        if not callable(source):
            raise TypeError(f"memory source for {kind!r} must be callable, got {source!r}")
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._sources[token] = (kind, source)

        def unregister() -> None:
            with self._lock:
                self._sources.pop(token, None)

        return unregister

    def register_lag_source(self, source: LagSource) -> Callable[[], None]:
        """Report ``source()`` (rank -> steps behind) as the replica lag gauge, per rank;
        returns the unregister function. Read on the export thread: cheap, no I/O."""
        if not callable(source):
            raise TypeError(f"lag source must be callable, got {source!r}")
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._lag_sources[token] = source

        def unregister() -> None:
            with self._lock:
                self._lag_sources.pop(token, None)

        return unregister

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._lag_sources.values())
        out: list[Observation] = []
        for source in sources:
            try:
                lags = dict(source())
            except Exception:
                log.warning("replica lag source failed", exc_info=True)
                continue
            out.extend(Observation(lag, {Attr.RANK: rank}) for rank, lag in sorted(lags.items()))
        return out

    def _observe_memory(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._sources.values())
        totals: dict[str, int] = {}
        for kind, source in sources:
            try:
                value = source()
            except Exception:
                log.warning("memory source failed", kind=kind, exc_info=True)
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                log.warning("memory source returned a bad value", kind=kind, value=repr(value))
                continue
            totals[kind] = totals.get(kind, 0) + value
        return [Observation(v, {Attr.MEMORY_KIND: k}) for k, v in sorted(totals.items())]


def _histogram(meter: Meter, spec: Instrument, buckets: tuple[float, ...]) -> Histogram:
    return meter.create_histogram(
        spec.name,
        unit=spec.unit,
        description=spec.description,
        explicit_bucket_boundaries_advisory=buckets,
    )


def _counter(meter: Meter, spec: Instrument) -> Counter:
    return meter.create_counter(spec.name, unit=spec.unit, description=spec.description)
