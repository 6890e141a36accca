"""One recovery as one trace across nodes, and snapshot-operation spans.

Parents are always explicit (never "whatever span is current"), so a recovery can be begun in
one trio task and its phases run in others; inside a phase the phase span is current, so log
lines and nested spans of that task (and of tasks it spawns) belong to it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Final, Self

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from supervise.telemetry.attributes import Attributes, attributes
from supervise.telemetry.config import TelemetryError
from supervise.telemetry.context import extract, inject, span_ids, using
from supervise.telemetry.lifecycle import Telemetry, get_telemetry
from supervise.telemetry.names import (
    RECOVERY_SPAN,
    Attr,
    Outcome,
    Phase,
    RecoveryEvent,
    SnapshotOp,
    Trigger,
)

log = structlog.get_logger(__name__)

_TERMINAL: Final = frozenset(o.value for o in Outcome)


# --- one traced operation --------------------------------------------------------------------


class OperationSpan:
    """A running phase or snapshot operation: add attributes and events while it runs."""

    __slots__ = ("_attributes", "span")

    def __init__(self, span: Span, initial: Attributes) -> None:
        self.span = span
        self._attributes: dict[str, AttributeValue] = dict(initial)

    @property
    def bytes(self) -> int | None:
        """The ``supervise.bytes`` set so far (what the byte counters record)."""
        value = self._attributes.get(Attr.BYTES)
        return value if isinstance(value, int) else None

    def get(self, key: str) -> AttributeValue | None:
        """An attribute set on this span so far (full key)."""
        return self._attributes.get(key)

    def set(self, values: Attributes | None = None, /, **short: object) -> None:
        """Add or replace attributes (same rules as ``attributes()``)."""
        checked = attributes(values, **short)
        self._attributes.update(checked)
        self.span.set_attributes(checked)

    def event(self, name: str, values: Attributes | None = None, /, **short: object) -> None:
        """Record a span event on this span."""
        if not name:
            raise TelemetryError("event name must be a non-empty string")
        self.span.add_event(name, attributes(values, **short))


def _mark_error(span: Span, exc: BaseException) -> None:
    if isinstance(exc, Exception):
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    else:  # trio.Cancelled, KeyboardInterrupt, SystemExit: not a failure of the operation itself
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


@contextlib.contextmanager
def _operation(
    telemetry: Telemetry,
    *,
    name: str,
    parent: Context | None,
    initial: Attributes,
    start_time_ns: int | None,
    on_end: Callable[[OperationSpan, float, BaseException | None], None],
) -> Iterator[OperationSpan]:
    # parent None: the span current when the ``with`` is entered (this runs at __enter__)
    span = telemetry.tracer.start_span(
        name, context=parent, attributes=initial, start_time=start_time_ns
    )
    op = OperationSpan(span, initial)
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        with trace.use_span(
            span, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield op
    except BaseException as exc:
        error = exc
        _mark_error(span, exc)
        raise
    finally:
        span.end()
        if start_time_ns is None:
            seconds = time.perf_counter() - started
        else:
            seconds = max(0.0, (time.time_ns() - start_time_ns) / 1e9)
        on_end(op, seconds, error)


def snapshot_span(
    op: SnapshotOp | str,
    values: Attributes | None = None,
    /,
    *,
    telemetry: Telemetry | None = None,
    start_time_ns: int | None = None,
    **short: object,
) -> contextlib.AbstractContextManager[OperationSpan]:
    """Span ``supervise.snapshot.<op>`` (capture, replicate, persist) plus its metrics.

    A child of the current span (a replicate inside a capture, a persist inside a phase).
    Records ``supervise.snapshot.duration`` and, once ``bytes`` is set, the io counter and
    throughput.
    """
    try:
        kind = SnapshotOp(op)
    except ValueError:
        listed = ", ".join(o.value for o in SnapshotOp)
        raise TelemetryError(f"snapshot operation {op!r}: must be one of {listed}") from None
    tel = get_telemetry() if telemetry is None else telemetry
    initial = attributes(values, **short)
    if not (tel.traces_enabled or tel.metrics_enabled):
        # Off: same checks, no span, no context switch, no clock (this runs every capture).
        return contextlib.nullcontext(OperationSpan(trace.INVALID_SPAN, initial))

    def on_end(span: OperationSpan, seconds: float, error: BaseException | None) -> None:
        metric_attrs: dict[str, AttributeValue] = {Attr.OPERATION: kind.value}
        if error is not None:
            metric_attrs["error.type"] = type(error).__name__
        tel.metrics.snapshot_duration.record(seconds, metric_attrs)
        if span.bytes is not None:
            tel.metrics.record_transfer(kind.value, span.bytes, seconds)

    return _operation(
        tel,
        name=kind.span_name,
        parent=None,
        initial=initial,
        start_time_ns=start_time_ns,
        on_end=on_end,
    )


# --- one recovery ----------------------------------------------------------------------------


class RecoveryTrace:
    """One recovery as one trace: a root span, its phases in order, its events, its outcome.

    The node that begins the recovery calls ``RecoveryTrace.begin``; it sends ``inject()``
    in its messages; every other node calls ``RecoveryTrace.join(carrier)`` and its phases
    become children of that same root. Retries stay in the trace: ``next_attempt()``.
    """

    def __init__(
        self,
        *,
        telemetry: Telemetry,
        root: Span | None,
        parent: Context,
        rank: int,
        trigger: str | None,
        attempt: int,
    ) -> None:
        self._telemetry = telemetry
        self._root = root
        self._parent = parent
        self._rank = rank
        self._trigger = trigger
        self._attempt = attempt
        self._last_phase = -1
        self._open: tuple[Phase, OperationSpan] | None = None
        self._started = time.perf_counter()
        self._outcome: Outcome | None = None

    # -- construction --

    @classmethod
    def begin(
        cls,
        trigger: Trigger | str,
        *,
        rank: int,
        attempt: int = 1,
        values: Attributes | None = None,
        parent: Mapping[str, object] | None = None,
        start_time_ns: int | None = None,
        telemetry: Telemetry | None = None,
        **short: object,
    ) -> RecoveryTrace:
        """Open the root ``supervise.recovery`` span: a new trace, unless ``parent`` (a
        carrier, e.g. from ``supervise recover``) names the span that asked for it."""
        tel = get_telemetry() if telemetry is None else telemetry
        initial = attributes(values, trigger=trigger, node_rank=rank, attempt=attempt, **short)
        context = Context() if parent is None else extract(parent)
        root = tel.tracer.start_span(
            RECOVERY_SPAN, context=context, attributes=initial, start_time=start_time_ns
        )
        recovery = cls(
            telemetry=tel,
            root=root,
            parent=trace.set_span_in_context(root, context),
            rank=rank,
            trigger=str(initial[Attr.TRIGGER]),
            attempt=attempt,
        )
        if start_time_ns is not None:  # the duration metric starts where the span starts
            recovery._started -= max(0.0, (time.time_ns() - start_time_ns) / 1e9)
        return recovery

    @classmethod
    def join(
        cls,
        carrier: Mapping[str, object],
        *,
        rank: int,
        attempt: int = 1,
        trigger: Trigger | str | None = None,
        telemetry: Telemetry | None = None,
    ) -> RecoveryTrace:
        """Take part, on this node, in a recovery begun elsewhere: this node's phases
        become children of the remote root named by ``carrier`` (from its ``inject()``)."""
        tel = get_telemetry() if telemetry is None else telemetry
        checked = attributes(node_rank=rank, attempt=attempt)
        if trigger is not None:
            checked = attributes(checked, trigger=trigger)
        context = extract(carrier)
        if not trace.get_current_span(context).get_span_context().is_valid:
            log.debug("recovery carrier has no valid traceparent; phases start new traces")
        return cls(
            telemetry=tel,
            root=None,
            parent=context,
            rank=rank,
            trigger=None if trigger is None else str(checked[Attr.TRIGGER]),
            attempt=attempt,
        )

    # -- state --

    @property
    def is_root(self) -> bool:
        """Whether this node holds the root span (``begin``) rather than joined one."""
        return self._root is not None

    @property
    def attempt(self) -> int:
        """The current attempt (1 for the first try)."""
        return self._attempt

    @property
    def outcome(self) -> Outcome | None:
        """How the recovery ended, once ``end`` was called."""
        return self._outcome

    @property
    def trace_id(self) -> str | None:
        """The trace id (32 hex digits), or None when nothing is traced."""
        ids = span_ids(trace.get_current_span(self._parent))
        return None if ids is None else ids[0]

    # -- phases and events --

    def phase(
        self,
        phase: Phase | str,
        values: Attributes | None = None,
        /,
        *,
        start_time_ns: int | None = None,
        **short: object,
    ) -> contextlib.AbstractContextManager[OperationSpan]:
        """Child span ``supervise.recovery.<phase>``; phases of one attempt run in order.

        Records ``supervise.recovery.phase.duration``; a fetch or restore that sets
        ``bytes`` also counts them (and their throughput) under its own operation name.
        """
        try:
            which = Phase(phase)
        except ValueError:
            listed = ", ".join(p.value for p in Phase)
            raise TelemetryError(f"recovery phase {phase!r}: must be one of {listed}") from None
        base: dict[str, object] = {"node_rank": self._rank, "attempt": self._attempt}
        if self._trigger is not None:
            base["trigger"] = self._trigger
        initial = attributes(values, **{**base, **short})
        tel = self._telemetry

        def on_end(op: OperationSpan, seconds: float, error: BaseException | None) -> None:
            self._open = None
            metric_attrs: dict[str, AttributeValue] = {Attr.PHASE: which.value}
            for key in (Attr.TRIGGER, Attr.SNAPSHOT_SOURCE):
                value = op.get(key)
                if value is not None:
                    metric_attrs[key] = value
            if error is not None:
                metric_attrs["error.type"] = type(error).__name__
            tel.metrics.phase_duration.record(seconds, metric_attrs)
            if which in (Phase.FETCH, Phase.RESTORE) and op.bytes is not None:
                source = op.get(Attr.SNAPSHOT_SOURCE)
                extra = {} if source is None else {Attr.SNAPSHOT_SOURCE: source}
                tel.metrics.record_transfer(which.value, op.bytes, seconds, extra)

        manager = _operation(
            tel,
            name=which.span_name,
            parent=self._parent,
            initial=initial,
            start_time_ns=start_time_ns,
            on_end=on_end,
        )
        return _OpenPhase(self, which, manager)

    def _enter_phase(self, which: Phase) -> None:
        if self._outcome is not None:
            raise TelemetryError(
                f"phase {which.value!r} after the recovery ended ({self._outcome})"
            )
        if self._open is not None:
            raise TelemetryError(
                f"phase {which.value!r} opened while {self._open[0].value!r} is still open"
            )
        if which.order <= self._last_phase:
            done = list(Phase)[self._last_phase].value
            raise TelemetryError(
                f"phase {which.value!r} out of order: {done!r} already ran in attempt"
                f" {self._attempt} (order: {', '.join(p.value for p in Phase)})"
            )
        self._last_phase = which.order

    def event(
        self, name: RecoveryEvent | str, values: Attributes | None = None, /, **short: object
    ) -> None:
        """Record an event on the root span (on a joined node: on the open phase).

        The outcome events (completed, failed, exhausted) come from ``end``.
        """
        if not name:
            raise TelemetryError("event name must be a non-empty string")
        text = str(name)
        if text in _TERMINAL:
            raise TelemetryError(f"event {text!r} is an outcome: call end({text!r}) instead")
        checked = attributes(values, **short)
        if self._root is not None:
            if self._outcome is not None:
                raise TelemetryError(f"event {text!r} after the recovery ended ({self._outcome})")
            self._root.add_event(text, checked)
        elif self._open is not None:
            self._open[1].span.add_event(text, checked)
        else:
            raise TelemetryError(
                f"event {text!r}: a joined recovery records events on its open phase, and none"
                " is open"
            )

    def set(self, values: Attributes | None = None, /, **short: object) -> None:
        """Set attributes on the root span (e.g. the selected snapshot version)."""
        if self._root is None:
            raise TelemetryError("set(): only the node that began the recovery holds its root")
        self._root.set_attributes(attributes(values, **short))

    def next_attempt(self) -> int:
        """Start the next attempt: the phases after detect may run again; returns its number."""
        if self._open is not None:
            raise TelemetryError(f"next_attempt() while phase {self._open[0].value!r} is open")
        self._attempt += 1
        self._last_phase = Phase.DETECT.order
        if self._root is not None:
            self._root.set_attribute(Attr.ATTEMPT, self._attempt)
        return self._attempt

    def inject(self) -> dict[str, str]:
        """The W3C carrier other nodes pass to ``RecoveryTrace.join`` (names the root)."""
        return inject(self._parent)

    def activate(self) -> contextlib.AbstractContextManager[None]:
        """Make the recovery's root the current span in this task (and the tasks it starts)
        for the block, so its log lines carry the recovery's ``trace_id`` / ``span_id``.

        Phases still name their parent explicitly; inside a phase the phase is current.
        """
        return using(self._parent)

    # -- the end --

    def end(
        self,
        outcome: Outcome | str,
        values: Attributes | None = None,
        /,
        *,
        error: BaseException | None = None,
        **short: object,
    ) -> None:
        """End the recovery: the outcome event on the root, its status, its metrics."""
        try:
            result = Outcome(outcome)
        except ValueError:
            listed = ", ".join(o.value for o in Outcome)
            raise TelemetryError(f"recovery outcome {outcome!r}: must be one of {listed}") from None
        if self._root is None:
            raise TelemetryError("end(): only the node that began the recovery ends it")
        if self._outcome is not None:
            raise TelemetryError(
                f"end({result.value!r}): the recovery already ended ({self._outcome})"
            )
        checked = attributes(values, attempt=self._attempt, **short)
        if error is not None:
            checked["exception.type"] = type(error).__name__
            checked["exception.message"] = str(error)
        self._outcome = result
        root = self._root
        root.add_event(result.value, checked)
        root.set_attribute(Attr.ATTEMPT, self._attempt)
        root.set_attribute(Attr.OUTCOME, result.value)
        if result is Outcome.COMPLETED:
            root.set_status(Status(StatusCode.OK))
        else:
            detail = str(checked.get(Attr.REASON, "")) or (
                "" if error is None else f"{type(error).__name__}: {error}"
            )
            root.set_status(
                Status(StatusCode.ERROR, f"recovery {result.value}: {detail}".rstrip(": "))
            )
        root.end()
        seconds = time.perf_counter() - self._started
        metric_attrs: dict[str, AttributeValue] = {Attr.OUTCOME: result.value}
        if self._trigger is not None:
            metric_attrs[Attr.TRIGGER] = self._trigger
        self._telemetry.metrics.recovery_duration.record(seconds, metric_attrs)
        self._telemetry.metrics.recoveries.add(1, metric_attrs)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leaving the block ends a begun recovery: failed on an exception, else completed."""
        if self._root is None or self._outcome is not None:
            return
        if exc is not None:
            self.end(Outcome.FAILED, error=exc)
        else:
            self.end(Outcome.COMPLETED)


class _OpenPhase(contextlib.AbstractContextManager[OperationSpan]):
    """Marks a phase open for the lifetime of its ``with`` block."""

    def __init__(
        self,
        trace_: RecoveryTrace,
        phase: Phase,
        manager: contextlib.AbstractContextManager[OperationSpan],
    ) -> None:
        self._trace = trace_
        self._phase = phase
        self._manager = manager

    def __enter__(self) -> OperationSpan:
        self._trace._enter_phase(self._phase)  # one class, split for the with
        op = self._manager.__enter__()
        self._trace._open = (self._phase, op)
        return op

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self._manager.__exit__(exc_type, exc, tb)
