"""The runtime's structlog logger, made harmless: a failing log call never breaks supervision.

Supervisors log from their hot paths; if the application's logging pipeline raises (a
processor bug, a closed pipe on stdout), losing a log line is better than losing the tree.
Failures are counted and the first one is reported on stderr.
"""

from __future__ import annotations

import sys
from typing import Any

import structlog


class SafeLogger:
    """``structlog.get_logger(name)`` whose calls swallow (and count) exceptions."""

    __slots__ = ("_log", "failures")

    def __init__(self, name: str) -> None:
        self._log = structlog.get_logger(name)
        self.failures = 0

    def info(self, event: str, **fields: Any) -> None:
        try:
            self._log.info(event, **fields)
        except Exception as exc:
            self._failed(event, exc)

    def warning(self, event: str, **fields: Any) -> None:
        try:
            self._log.warning(event, **fields)
        except Exception as exc:
            self._failed(event, exc)

    def error(self, event: str, **fields: Any) -> None:
        try:
            self._log.error(event, **fields)
        except Exception as exc:
            self._failed(event, exc)

    def _failed(self, event: str, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            try:
                print(f"supervise: logging {event!r} failed: {exc!r}", file=sys.stderr)
            except Exception:  # stderr is gone too: nothing left to tell
                return


log = SafeLogger("supervise.runtime")
