"""The coordination store (torch-free): records with revisions and compare-and-swap
transactions, leases kept alive by a supervised child, prefix watches that survive compaction,
and leader election whose revision fences every write. Backends: embedded (in-process, no
server) and etcd v3 (its JSON gateway, over httpx under trio). See docs/store.md."""

from supervise.store.base import Store
from supervise.store.config import (
    DEFAULT_JOB,
    EMBEDDED,
    KEY_ROOT,
    StoreConfig,
    StoreKind,
    parse_store_url,
)
from supervise.store.election import Election, Leadership
from supervise.store.embedded import EmbeddedStore
from supervise.store.errors import (
    BadStoreUrl,
    Compacted,
    FencedWriteRefused,
    LeaseLost,
    StoreError,
    StoreRejected,
    StoreUnavailable,
)
from supervise.store.follow import Change, Follow, Resync
from supervise.store.lease import keep_alive
from supervise.store.opening import open_store, probe
from supervise.store.records import (
    Compare,
    CompareOp,
    CompareTarget,
    Delete,
    Event,
    EventKind,
    Get,
    Op,
    Put,
    Record,
    Snapshot,
    TxnResult,
    created_at,
    missing,
    modified_at,
)

__all__ = [
    "DEFAULT_JOB",
    "EMBEDDED",
    "KEY_ROOT",
    "BadStoreUrl",
    "Change",
    "Compacted",
    "Compare",
    "CompareOp",
    "CompareTarget",
    "Delete",
    "Election",
    "EmbeddedStore",
    "Event",
    "EventKind",
    "FencedWriteRefused",
    "Follow",
    "Get",
    "Leadership",
    "LeaseLost",
    "Op",
    "Put",
    "Record",
    "Resync",
    "Snapshot",
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreKind",
    "StoreRejected",
    "StoreUnavailable",
    "TxnResult",
    "created_at",
    "keep_alive",
    "missing",
    "modified_at",
    "open_store",
    "parse_store_url",
    "probe",
]
