"""Store fixtures: a real etcd (1 member, shared by a module) and the backend parameter.

``store`` runs a test on both backends: the embedded one in virtual time (``clock`` is an
autojump clock there), etcd in real time. Every test gets its own key prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio.testing

from supervise._testing.etcd import EtcdCluster, EtcdError, install_etcd
from supervise._testing.procs import pid_alive
from supervise.store import EMBEDDED, Store, StoreConfig, open_store, parse_store_url

BACKENDS = ("embedded", "etcd")
_prefixes = itertools.count()


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


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend under test."""
    return str(request.param)


@pytest.fixture
def clock(backend: str) -> trio.testing.MockClock | None:
    """Virtual time for the embedded store; real time for etcd (it runs in another process)."""
    return trio.testing.MockClock(autojump_threshold=0) if backend == "embedded" else None


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"/test/{next(_prefixes)}/"


@pytest.fixture
def store_config(backend: str, request: pytest.FixtureRequest) -> StoreConfig:
    """The backend's config (etcd: the module's member, started on first use)."""
    if backend == "embedded":
        return parse_store_url(EMBEDDED)
    etcd: EtcdCluster = request.getfixturevalue("etcd1")
    return parse_store_url(etcd.url)


@pytest.fixture
async def store(store_config: StoreConfig) -> AsyncIterator[Store]:
    """A client of the backend under test."""
    made = open_store(store_config)
    try:
        yield made
    finally:
        await made.aclose()
