"""configure_logging: JSON lines off a terminal, console on one; trace_id/span_id of the
current span on every line; stdlib logging through the same pipeline."""

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from supervise.telemetry import RecoveryTrace, TelemetryError, configure_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Puts logging back as it was. structlog's processor list is restored in place, not
    replaced: loggers cached during the test (the runtime's, say) keep following the
    configuration, so `capture_logs` in later tests still sees them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    processors = config["processors"]
    saved = list(processors)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    processors[:] = saved
    structlog.configure(**config)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_trace_and_span_ids(make_node) -> None:
    out = io.StringIO()
    configure_logging(stream=out)  # StringIO is not a terminal: JSON
    log = structlog.get_logger("supervise.agents.executor")
    node = make_node()
    log.info("before recovery")
    rt = RecoveryTrace.begin("worker_exit", rank=0, telemetry=node.telemetry)
    with rt.phase("detect") as op:
        log.info("worker exited", exit_code=-9)
        logging.getLogger("torch.distributed").warning("rendezvous %s lost", "tcp://x")
        ids = op.span.get_span_context()
    rt.end("completed")
    log.info("after recovery")

    before, inside, stdlib, after = _lines(out)
    assert "trace_id" not in before and "span_id" not in before
    assert "trace_id" not in after
    for line in (inside, stdlib):
        assert line["trace_id"] == format(ids.trace_id, "032x") == rt.trace_id
        assert line["span_id"] == format(ids.span_id, "016x")
    assert inside["event"] == "worker exited"
    assert inside["exit_code"] == -9
    assert inside["level"] == "info"
    assert inside["logger"] == "supervise.agents.executor"
    assert str(inside["timestamp"]).endswith("Z")
    assert stdlib["event"] == "rendezvous tcp://x lost"
    assert stdlib["logger"] == "torch.distributed"
    assert stdlib["level"] == "warning"


def test_module_logger_name_is_inferred() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    structlog.get_logger().info("hello")
    (line,) = _lines(out)
    assert line["logger"] == __name__


def test_level_filters_both_paths() -> None:
    out = io.StringIO()
    configure_logging(json=True, level="warning", stream=out)
    structlog.get_logger("a").info("dropped")
    logging.getLogger("b").info("dropped too")
    structlog.get_logger("a").error("kept")
    assert [line["event"] for line in _lines(out)] == ["kept"]


def test_exceptions_are_structured_in_json() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    try:
        raise ValueError("bad shard")
    except ValueError:
        structlog.get_logger("x").exception("restore failed")
    (line,) = _lines(out)
    assert line["event"] == "restore failed"
    assert line["exception"][0]["exc_type"] == "ValueError"
    assert line["exception"][0]["exc_value"] == "bad shard"


def test_console_renderer_on_a_terminal(make_node) -> None:
    out = _Tty()
    configure_logging(stream=out)
    node = make_node()
    with node.telemetry.tracer.start_as_current_span("x") as span:
        structlog.get_logger("y").info("hello", k=1)
    text = out.getvalue()
    assert not text.lstrip().startswith("{")
    assert "hello" in text
    assert format(span.get_span_context().trace_id, "032x") in text


def test_reconfiguring_does_not_duplicate_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(json=True, stream=first)
    configure_logging(json=True, stream=second)
    logging.getLogger("z").warning("once")
    assert first.getvalue() == ""
    assert [line["event"] for line in _lines(second)] == ["once"]


def test_loggers_in_use_follow_a_reconfiguration() -> None:
    """Loggers are cached on first use (no per-event assembly on the restart path), yet a
    logger cached under one configure_logging follows the next one, and capture_logs."""
    configure_logging(json=True, stream=io.StringIO())
    assert structlog.get_config()["cache_logger_on_first_use"] is True
    log = structlog.get_logger("supervise.runtime.test")
    log.info("first use caches it")
    out = io.StringIO()
    configure_logging(json=True, level="warning", stream=out)
    log.info("filtered by the new level")
    log.warning("after")
    assert [line["event"] for line in _lines(out)] == ["after"]
    with capture_logs() as logs:
        log.info("captured")
    assert [e["event"] for e in logs] == ["captured"]


@pytest.mark.parametrize("level", ["LOUD", -1, True])
def test_bad_level_is_a_one_line_error(level: object) -> None:
    with pytest.raises(TelemetryError, match="log level"):
        configure_logging(level=level)  # type: ignore[arg-type]
