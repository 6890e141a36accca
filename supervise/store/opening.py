"""Open the store a `StoreConfig` names."""

from __future__ import annotations

from supervise.store.base import Store
from supervise.store.config import StoreConfig, StoreKind
from supervise.store.embedded import EmbeddedStore


def open_store(config: StoreConfig) -> Store:
    """A client for ``config`` (close it with ``await store.aclose()``); connects lazily."""
    if config.kind is StoreKind.EMBEDDED:
        return EmbeddedStore()
    from supervise.store.etcd import EtcdStore  # httpx only where etcd is used

    return EtcdStore(config)


async def probe(store: Store, config: StoreConfig) -> int:
    """One read under the job's prefix: the store revision, or `StoreUnavailable` (start-up
    checks: an unreachable etcd is a one-line error, not a hang)."""
    return (await store.range(config.prefix, prefix=True)).revision
