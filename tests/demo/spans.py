"""Synthetic recovery spans, as the OTLP receiver decodes them (for the demo's unit tests)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from supervise.telemetry.receiver import ReceivedEvent, ReceivedSpan, Value

_ids = itertools.count(1)
NS = 1_000_000_000


def span(
    name: str,
    trace: str,
    start: float,
    end: float,
    *,
    parent: str = "",
    attributes: Mapping[str, Value] | None = None,
    events: tuple[tuple[str, float, Mapping[str, Value]], ...] = (),
    error: str = "",
) -> ReceivedSpan:
    return ReceivedSpan(
        name=name,
        trace_id=trace,
        span_id=f"{next(_ids):016x}",
        parent_span_id=parent,
        kind=1,
        start_unix_nano=int(start * NS),
        end_unix_nano=int(end * NS),
        attributes=dict(attributes or {}),
        events=tuple(ReceivedEvent(n, int(t * NS), dict(a)) for n, t, a in events),
        status_code=2 if error else 0,
        status_message=error,
        resource={"service.name": "supervise"},
        scope="supervise",
    )


def recovery(
    trace: str,
    *,
    start: float,
    trigger: str,
    nodes: int = 2,
    fetch_node: int | None = None,
    detect_s: float = 0.01,
    startup_s: float = 3.0,
) -> list[ReceivedSpan]:
    """One completed recovery: detect and select on node 0, then every node restores."""
    detected = start + detect_s
    selected = detected + 0.2
    restore_at = selected + (0.1 if fetch_node is not None else 0.0) + startup_s
    end = restore_at + 0.3
    root = span(
        "supervise.recovery",
        trace,
        start,
        end,
        attributes={"supervise.trigger": trigger, "supervise.node.rank": 0, "supervise.attempt": 1},
        events=(
            ("detected", detected, {"supervise.reason": "rank=1"}),
            ("started", detected, {}),
            ("checkpoint_selected", selected, {"supervise.snapshot.version": 40}),
            ("restored", restore_at + 0.1, {}),
            ("completed", end, {}),
        ),
    )
    common = {"supervise.trigger": trigger, "supervise.attempt": 1}
    out = [
        root,
        span("supervise.recovery.detect", trace, start, detected, parent=root.span_id,
             attributes={**common, "supervise.node.rank": 0}),
        span("supervise.recovery.select_checkpoint", trace, detected, selected,
             parent=root.span_id, attributes={**common, "supervise.node.rank": 0,
                                              "supervise.snapshot.version": 40}),
    ]  # fmt: skip
    if fetch_node is not None:
        out.append(
            span("supervise.recovery.fetch", trace, selected, selected + 0.1, parent=root.span_id,
                 attributes={**common, "supervise.node.rank": fetch_node, "supervise.bytes": 100,
                             "supervise.snapshot.source": "peer"})
        )  # fmt: skip
    for node in range(nodes):
        source = "peer" if node == fetch_node else "local"
        out.append(
            span("supervise.recovery.restore", trace, restore_at, restore_at + 0.05,
                 parent=root.span_id, attributes={**common, "supervise.node.rank": node,
                 "supervise.bytes": 1 << 20, "supervise.snapshot.source": source})
        )  # fmt: skip
        out.append(
            span("supervise.recovery.resume", trace, restore_at + 0.05, end - 0.01,
                 parent=root.span_id, attributes={**common, "supervise.node.rank": node})
        )  # fmt: skip
    return out
