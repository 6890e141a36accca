"""Errors of the cluster data plane: each says in one line what was wrong."""

from __future__ import annotations


class ClusterError(Exception):
    """Base class for errors of the cluster data plane."""


class ProtocolError(ClusterError):
    """A message that does not follow the wire protocol (malformed, truncated, oversized)."""


class RequestTimeout(ClusterError, TimeoutError):
    """No reply to a request within its timeout."""


class Declined(ClusterError):
    """A handler's deliberate no (a push of a version the store will not take): an answer,
    not a failure. The caller gets it as a `RemoteError` like any other; the serving side
    logs it at debug instead of as a failed handler."""


class RemoteError(ClusterError):
    """The peer's handler failed on our request; carries the peer's one-line reason."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


class PeerUnknown(ClusterError, KeyError):
    """A rank that has no endpoint in this transport's peer map."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown peer"


class CurveKeyError(ClusterError):
    """A CURVE key file that is missing or unreadable."""


class ChecksumMismatch(ClusterError):
    """Bytes whose hash differs from the manifest's: never stored, never served."""


class TransferAborted(ClusterError):
    """A transfer that was cancelled (superseded, peer lost, refused) before completing."""
