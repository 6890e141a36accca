"""Store fixtures: the backend parameter (the etcd fixtures are in tests/conftest.py).

``store`` runs a test on both backends: the embedded one in virtual time (``clock`` is an
autojump clock there), etcd in real time. Every test gets its own key prefix.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
import trio.testing

from supervise.store import EMBEDDED, Store, StoreConfig, open_store, parse_store_url

BACKENDS = ("embedded", "etcd")
_prefixes = itertools.count()


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
    etcd = request.getfixturevalue("etcd1")
    return parse_store_url(etcd.url)


@pytest.fixture
async def store(store_config: StoreConfig) -> AsyncIterator[Store]:
    """A client of the backend under test."""
    made = open_store(store_config)
    try:
        yield made
    finally:
        await made.aclose()
