"""Shared fixtures for the test suite."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from supervise._testing import OtelCollector
from supervise._testing.etcd import EtcdCluster, EtcdError, install_etcd
from supervise._testing.procs import pid_alive
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


@pytest.fixture(scope="session")
def etcd_binary() -> Path:
    """The etcd binary; installed (apt, as root) where missing; skips only if neither works."""
    try:
        return install_etcd()
    except (EtcdError, OSError) as exc:
        pytest.skip(f"no etcd: {exc}")


def run_cluster(base: Path, binary: Path, size: int) -> Iterator[EtcdCluster]:
    """A started cluster; afterwards every member is gone (stopped by PID)."""
    cluster = EtcdCluster(base, size=size, binary=binary).start()
    pids = cluster.pids
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not [p for p in pids if pid_alive(p)], "an etcd member outlived its cluster"


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory, etcd_binary: Path) -> Iterator[EtcdCluster]:
    """One etcd member on free loopback ports, for the tests of one module."""
    yield from run_cluster(tmp_path_factory.mktemp("etcd1"), etcd_binary, 1)


@pytest.fixture
def etcd3(tmp_path: Path, etcd_binary: Path) -> Iterator[EtcdCluster]:
    """Three etcd members on loopback, for one test."""
    yield from run_cluster(tmp_path / "etcd3", etcd_binary, 3)
