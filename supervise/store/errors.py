"""What the coordination store raises: one base class, a type for each thing a caller acts on."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """The gRPC status codes etcd answers with (in the gateway's error bodies), used alike by
    the embedded store so both refuse the same things the same way."""

    CANCELLED = 1
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5  # an unknown lease
    RESOURCE_EXHAUSTED = 8
    ABORTED = 10
    OUT_OF_RANGE = 11  # a compacted or future revision
    UNAVAILABLE = 14  # no leader, shutting down


#: Codes after which another endpoint, or a later try, may answer.
RETRYABLE_CODES: frozenset[int] = frozenset(
    {
        Code.CANCELLED,
        Code.DEADLINE_EXCEEDED,
        Code.RESOURCE_EXHAUSTED,
        Code.ABORTED,
        Code.UNAVAILABLE,
    }
)


class StoreError(Exception):
    """Any failure of the coordination store."""


class BadStoreUrl(StoreError, ValueError):
    """A ``--store`` URL (or its TLS files) that cannot be used; the message is one line."""

    def __init__(self, url: str, why: str) -> None:
        self.url = url
        self.why = why
        super().__init__(f"store {url!r}: {why}")


class StoreUnavailable(StoreError):
    """No endpoint answered (down, unreachable, too slow): back off and try again."""

    def __init__(self, what: str, why: str) -> None:
        self.what = what
        self.why = why
        super().__init__(f"store unavailable for {what}: {why}")


class StoreRejected(StoreError):
    """The store answered with an error that retrying will not fix (a bad request)."""

    def __init__(self, what: str, code: int, message: str) -> None:
        self.what = what
        self.code = code
        super().__init__(f"store refused {what}: {message} (code {code})")


class Compacted(StoreError):
    """A watch asked for history the store has compacted away: re-read, then resume."""

    def __init__(self, start_revision: int, compact_revision: int) -> None:
        self.start_revision = start_revision
        self.compact_revision = compact_revision
        super().__init__(
            f"revision {start_revision} is compacted (history starts at {compact_revision})"
        )


class LeaseLost(StoreError):
    """A lease expired or was revoked under its holder: the keys attached to it are gone."""

    def __init__(self, lease: int, why: str) -> None:
        self.lease = lease
        self.why = why
        super().__init__(f"lease {lease:x} lost: {why}")


class FencedWriteRefused(StoreError):
    """A leader's write was refused: its leadership (the key at that revision) is gone."""

    def __init__(self, election: str, revision: int) -> None:
        self.election = election
        self.revision = revision
        super().__init__(
            f"write refused: leadership of {election!r} at revision {revision} is no longer held"
        )
