"""The metric instruments (one set per meter) and the memory-held gauge's sources."""

from __future__ import annotations

import threading
import weakref
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
#: Tasks by state on a farm (state name -> how many), e.g. {"pending": 3, "running": 2}.
TaskCountSource = Callable[[], Mapping[str, int]]
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
        self.task_step_duration = _histogram(meter, Metric.TASK_STEP_DURATION, DURATION_BUCKETS_S)
        self.tasks_finished = _counter(meter, Metric.TASKS_FINISHED)
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

        self._task_sources: dict[int, TaskCountSource] = {}
        self.tasks_queued = meter.create_observable_gauge(
            Metric.TASKS_QUEUED.name,
            callbacks=[lambda _o: self._observe_tasks("pending")],
            unit=Metric.TASKS_QUEUED.unit,
            description=Metric.TASKS_QUEUED.description,
        )
        self.tasks_running = meter.create_observable_gauge(
            Metric.TASKS_RUNNING.name,
            callbacks=[lambda _o: self._observe_tasks("running")],
            unit=Metric.TASKS_RUNNING.unit,
            description=Metric.TASKS_RUNNING.description,
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

    def register_task_source(self, source: TaskCountSource) -> Callable[[], None]:
        """Report ``source()`` (state -> tasks) as the queued and running gauges (several
        sources are summed); returns the unregister function. Read on the export thread."""
        if not callable(source):
            raise TypeError(f"task count source must be callable, got {source!r}")
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._task_sources[token] = source

        def unregister() -> None:
            with self._lock:
                self._task_sources.pop(token, None)

        return unregister

    def _observe_tasks(self, state: str) -> Iterable[Observation]:
        with self._lock:
            sources = list(self._task_sources.values())
        if not sources:
            return []
        total = 0
        for source in sources:
            try:
                total += int(source().get(state, 0))
            except Exception:
                log.warning("task count source failed", exc_info=True)
        return [Observation(total)]

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


_by_meter: weakref.WeakKeyDictionary[Meter, Instruments] = weakref.WeakKeyDictionary()
_by_meter_lock = threading.Lock()


def instruments_for(meter: Meter) -> Instruments:
    """The instruments of ``meter``, created on its first use only: a second set on one meter
    would be a duplicate the SDK ignores (with its gauges' callbacks)."""
    with _by_meter_lock:
        found = _by_meter.get(meter)
        if found is None:
            found = _by_meter[meter] = Instruments(meter)
        return found


def _histogram(meter: Meter, spec: Instrument, buckets: tuple[float, ...]) -> Histogram:
    return meter.create_histogram(
        spec.name,
        unit=spec.unit,
        description=spec.description,
        explicit_bucket_boundaries_advisory=buckets,
    )


def _counter(meter: Meter, spec: Instrument) -> Counter:
    return meter.create_counter(spec.name, unit=spec.unit, description=spec.description)
