"""What the node agent relies on beyond the recovery tree: the recovery made current for log
lines (``activate``), a block outside any trace (``untraced``), span ids that no
``random.seed`` repeats."""

import io
import json
import logging
import random
from collections.abc import Iterator

import pytest
import structlog
import trio

from supervise.telemetry import RecoveryTrace, configure_logging, untraced


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """JSON log lines into a buffer; logging is put back afterwards (in place, see
    test_telemetry_logging)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    processors = config["processors"]
    saved = list(processors)
    out = io.StringIO()
    configure_logging(stream=out)
    yield out
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    processors[:] = saved
    structlog.configure(**config)


def _lines(out: io.StringIO) -> dict[str, dict[str, object]]:
    lines = [json.loads(x) for x in out.getvalue().splitlines() if x.strip()]
    return {str(line["event"]): line for line in lines}


async def test_an_activated_recovery_is_on_every_line_of_its_tasks(make_node, log_lines) -> None:
    node = make_node()
    log = structlog.get_logger("supervise.agents.coordinator")
    rt = RecoveryTrace.begin("worker_exit", rank=0, telemetry=node.telemetry)
    remote = RecoveryTrace.join(rt.inject(), rank=1, telemetry=make_node(rank=1).telemetry)

    async def child() -> None:
        log.info("in a task started by the recovery")

    async def long_lived() -> None:
        log.info("in a task started untraced")

    with rt.activate():
        log.info("recovery")
        with rt.phase("detect") as op:
            log.info("in a phase")
            phase_id = format(op.span.get_span_context().span_id, "016x")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            with untraced():
                nursery.start_soon(long_lived)
                log.info("untraced")
    log.info("after")
    with remote.activate():
        log.info("on the joined node")
    rt.end("completed")

    lines = _lines(log_lines)
    root_id = format(node.span("supervise.recovery").context.span_id, "016x")
    for event in ("recovery", "in a task started by the recovery", "on the joined node"):
        assert lines[event]["trace_id"] == rt.trace_id, event
        assert lines[event]["span_id"] == root_id, event
    assert lines["in a phase"]["span_id"] == phase_id
    for event in ("in a task started untraced", "untraced", "after"):
        assert "trace_id" not in lines[event], event


def test_span_ids_do_not_follow_the_global_random_seed(make_node) -> None:
    # Training scripts seed `random` alike on every rank, and a restore rewinds it: the SDK's
    # default generator would give those processes the same trace and span ids.
    node = make_node()
    ids = []
    for _ in range(2):
        random.seed(1234)
        with node.telemetry.tracer.start_as_current_span("x") as span:
            ctx = span.get_span_context()
            ids.append((ctx.trace_id, ctx.span_id))
    assert ids[0][0] != ids[1][0]
    assert ids[0][1] != ids[1][1]
    assert all(t != 0 and s != 0 for t, s in ids)
