"""Snapshot errors: one base class, one subclass per thing a caller may want to handle."""

from __future__ import annotations


class SnapshotError(Exception):
    """Something about taking, keeping or loading a snapshot went wrong."""


class CapacityError(SnapshotError):
    """Not enough shared memory, RAM budget or disk for what was asked (checked up front)."""


class CorruptSnapshot(SnapshotError):
    """Stored bytes do not match their manifest (checksum, size or header)."""


class UnsupportedFormat(CorruptSnapshot):
    """Stored in a format this version does not read (written by another supervise version):
    refused in one line and left in place (never quarantined or removed)."""


class FinishedJob(SnapshotError):
    """The job finished before and resuming it was not asked for."""


class ProtocolError(SnapshotError):
    """A malformed or unexpected message between a worker and its agent."""


class Unauthorized(SnapshotError):
    """A request without a valid worker token, or for a rank its token was not issued to."""


class AgentUnavailable(SnapshotError):
    """The node agent did not answer within the timeout."""
