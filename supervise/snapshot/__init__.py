"""Torch-free snapshot storage: shared-memory arenas, manifests with XXH3 checksums,
retention, the safetensors persist tier, and the worker <-> agent local protocol."""

from typing import Any

from supervise.snapshot.arena import Arena, SlotState
from supervise.snapshot.budget import MemoryBudget
from supervise.snapshot.errors import (
    AgentUnavailable,
    CapacityError,
    CorruptSnapshot,
    FinishedJob,
    ProtocolError,
    SnapshotError,
    Unauthorized,
    UnsupportedFormat,
)
from supervise.snapshot.hashing import Checksum
from supervise.snapshot.manifest import Layout, Manifest, TensorEntry
from supervise.snapshot.persist import DiskEntry, Persister, PersistTier
from supervise.snapshot.protocol import AGENT_ENV, TOKEN_ENV
from supervise.snapshot.retention import RetentionRule, VersionInfo
from supervise.snapshot.service import ArenaService, Candidate, CommitEvent, Refusal, Shard
from supervise.snapshot.tokens import Grant, RankTokens

_LAZY = {"AgentClient", "LocalOwner", "Owner"}  # the zmq client: import on use


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from supervise.snapshot import client

        return getattr(client, name)
    raise AttributeError(f"module 'supervise.snapshot' has no attribute {name!r}")


__all__ = [
    "AGENT_ENV",
    "TOKEN_ENV",
    "AgentClient",
    "AgentUnavailable",
    "Arena",
    "ArenaService",
    "Candidate",
    "CapacityError",
    "Checksum",
    "CommitEvent",
    "CorruptSnapshot",
    "DiskEntry",
    "FinishedJob",
    "Grant",
    "Layout",
    "LocalOwner",
    "Manifest",
    "MemoryBudget",
    "Owner",
    "PersistTier",
    "Persister",
    "ProtocolError",
    "RankTokens",
    "Refusal",
    "RetentionRule",
    "Shard",
    "SlotState",
    "SnapshotError",
    "TensorEntry",
    "Unauthorized",
    "UnsupportedFormat",
    "VersionInfo",
]
