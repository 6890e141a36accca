"""structlog for the whole product: one pipeline for structlog and stdlib ``logging``.

JSON lines when the stream is not a terminal (collectors, CI, files), a readable console
rendering when it is. Every line carries timestamp, level, logger and, inside a span, the
span's ``trace_id`` and ``span_id`` so logs and traces join up. Library code only calls
``structlog.get_logger()``; the application calls ``configure_logging()`` once.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import IO, Any, Final

import structlog
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

from supervise.telemetry.config import TelemetryError

_HANDLER_NAME: Final = "supervise"
_lock = threading.Lock()


def add_trace_context(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: ``trace_id`` / ``span_id`` of the current span, if there is one."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict


def _level(level: int | str) -> int:
    if isinstance(level, bool):
        raise TelemetryError(f"log level {level!r}: must be a level name or number")
    if isinstance(level, int):
        if level < 0:
            raise TelemetryError(f"log level {level!r}: must be >= 0")
        return level
    number = logging.getLevelNamesMapping().get(str(level).strip().upper())
    if number is None:
        names = ", ".join(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
        raise TelemetryError(f"log level {level!r}: must be one of {names} or a number")
    return number


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        add_trace_context,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.StackInfoRenderer(),
    ]


def _drop_color_message(
    _logger: WrappedLogger, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict.pop("color_message", None)  # uvicorn-style duplicates, noise in JSON
    return event_dict


def configure_logging(
    json: bool | None = None,
    level: int | str = "INFO",
    *,
    stream: IO[str] | None = None,
) -> None:
    """Route structlog and stdlib logging through one pipeline writing to ``stream``.

    ``json=None`` picks JSON lines unless ``stream`` (default: stderr) is a terminal.
    Loggers are cached on first use; calling it again replaces the previous configuration
    (no duplicate handlers), also for loggers already in use.
    """
    number = _level(level)
    out = sys.stderr if stream is None else stream
    if json is None:
        isatty = getattr(out, "isatty", None)
        json = not (callable(isatty) and isatty())
    shared = _shared_processors()
    renderer: Processor
    if json:
        final: list[Processor] = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_color_message,
            structlog.processors.dict_tracebacks,
        ]
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        final = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
        renderer = structlog.dev.ConsoleRenderer(colors=_colors(out))
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared, processors=[*final, renderer]
    )
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    handler.setLevel(number)

    processors: list[Processor] = [
        structlog.stdlib.filter_by_level,
        *shared,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.UnicodeDecoder(),
        structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
    ]
    with _lock:
        root = logging.getLogger()
        for old in list(root.handlers):
            if old.get_name() == _HANDLER_NAME:
                root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(number)
        _join_torch_loggers()
        current = structlog.get_config()["processors"]
        if isinstance(current, list):
            # Cached loggers hold this very list: fill it in place and they follow along (as
            # structlog's own capture_logs does).
            current[:] = processors
            processors = current
        structlog.configure(
            processors=processors,
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )


def _join_torch_loggers() -> None:
    """torch, once imported, logs "torch" and "torch.distributed" through its own stderr
    handler with propagation off; route them through the one pipeline instead."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or logger.propagate:
            continue
        if name == "torch" or name.startswith("torch."):
            for h in list(logger.handlers):
                if type(h) is logging.StreamHandler:
                    logger.removeHandler(h)
            logger.propagate = True


def _colors(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())
