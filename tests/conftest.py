"""Shared fixtures for the test suite."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from supervise._testing import OtelCollector
from supervise.telemetry import shutdown_telemetry


@pytest.fixture
def otel_collector(tmp_path: Path) -> Iterator[OtelCollector]:
    """A real collector (rotel) on free loopback ports; read what it got from ``.spans()``.

    Fails (never skips) when rotel is not installed: it is in the ``dev`` extra. rotel is
    stopped by PID afterwards, also when the test fails.
    """
    with OtelCollector(tmp_path / "otel") as collector:
        yield collector


@pytest.fixture
def otel_env(
    otel_collector: OtelCollector, monkeypatch: pytest.MonkeyPatch
) -> Iterator[OtelCollector]:
    """``otel_collector`` plus ``OTEL_*`` in this process's environment pointing at it.

    Code under test that calls ``setup_telemetry()`` exports to the collector; the process's
    telemetry is shut down (flushed) afterwards so the next test starts clean.
    """
    for key, value in otel_collector.env(metric_export_interval_ms=500).items():
        monkeypatch.setenv(key, value)
    shutdown_telemetry()
    try:
        yield otel_collector
    finally:
        shutdown_telemetry()
