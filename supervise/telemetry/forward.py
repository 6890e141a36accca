"""Pass OTLP/HTTP exports on, unchanged, to the collector the user configured with ``OTEL_*``.

`supervise demo` receives its agents' spans itself (to draw the recovery timeline); when the
user has a collector of their own, every export is also forwarded there, from one background
thread, so the demo's traces show up where the user already looks.
"""

from __future__ import annotations

import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Final

import attrs

from supervise.telemetry.config import TelemetryConfig

_QUEUE_MAX: Final = 1024
_TIMEOUT_S: Final = 10.0


@attrs.frozen(slots=True)
class ForwardTarget:
    """Where exports received on one OTLP path (``/v1/traces``) go: a URL and its headers."""

    url: str
    headers: Mapping[str, str] = attrs.field(factory=dict)


def forward_targets(config: TelemetryConfig) -> dict[str, ForwardTarget]:
    """The OTLP targets of ``config`` by receiver path (signals exported over OTLP only)."""
    targets: dict[str, ForwardTarget] = {}
    for path, signal in (("/v1/traces", config.traces), ("/v1/metrics", config.metrics)):
        if "otlp" in signal.exporters and signal.endpoint:
            targets[path] = ForwardTarget(signal.endpoint, dict(signal.headers))
    return targets


class OtlpForwarder:
    """A background thread that POSTs each submitted export to its target; never blocks the
    caller (a full queue drops the export and counts it)."""

    def __init__(self, targets: Mapping[str, ForwardTarget]) -> None:
        self.targets = dict(targets)
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(_QUEUE_MAX)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0
        self.errors: list[str] = []

    def start(self) -> OtlpForwarder:
        """Start the sending thread (once)."""
        if self._thread is None and self.targets:
            self._thread = threading.Thread(target=self._run, name="otlp-forward", daemon=True)
            self._thread.start()
        return self

    def submit(self, path: str, body: bytes) -> None:
        """Queue ``body`` (a protobuf export request received on ``path``) for its target."""
        if path not in self.targets or self._thread is None:
            return
        try:
            self._queue.put_nowait((path, body))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued (up to ``timeout_s``), then stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, body = item
            target = self.targets[path]
            request = urllib.request.Request(
                target.url,
                data=body,
                method="POST",
                headers={**target.headers, "Content-Type": "application/x-protobuf"},
            )
            try:
                with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as reply:
                    reply.read()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                with self._lock:
                    if len(self.errors) < 20:
                        self.errors.append(f"{target.url}: {exc}")
            else:
                with self._lock:
                    self.sent += 1
