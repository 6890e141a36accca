"""W3C trace context for message headers: ``inject`` the current span, ``extract`` a peer's;
and which context is current in a task (``using``, ``untraced``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_CARRIER_KEYS: Final = ("traceparent", "tracestate")


def inject(context: Context | None = None) -> dict[str, str]:
    """W3C ``traceparent`` (and ``tracestate``) of the current span, for a message header.

    Empty when there is no valid span (telemetry off and no remote parent).
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, object]) -> Context:
    """The context a remote ``inject`` produced: spans started in it are its children.

    A missing or malformed ``traceparent`` gives an empty context (a peer's bad header must
    not break a recovery); only the W3C keys are read.
    """
    clean = {k: v for k in _CARRIER_KEYS if isinstance(v := carrier.get(k), str)}
    return _PROPAGATOR.extract(clean, context=Context())


def span_ids(span: Span) -> tuple[str, str] | None:
    """(trace_id, span_id) of ``span`` as lowercase hex, or None when it is not valid."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@contextlib.contextmanager
def using(context: Context) -> Iterator[None]:
    """Make ``context`` current in this task (and in tasks it starts) for the block."""
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def untraced() -> contextlib.AbstractContextManager[None]:
    """No span is current in the block: what it starts (a long-lived task, a worker's output
    reader) does not inherit the trace of the operation that happens to start it."""
    return using(Context())
