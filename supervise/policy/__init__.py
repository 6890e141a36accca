"""Declarative policies: what to snapshot and when, what to keep, where to replicate, how to
recover. Frozen attrs classes, read from Python, dicts or TOML files, validated on the way in.
"""

from supervise.policy.errors import PolicyError, Problem
from supervise.policy.model import Policy
from supervise.policy.schedule import CaptureSchedule, Reason, ScheduleState
from supervise.policy.sections import (
    Cluster,
    Persist,
    Recovery,
    Replication,
    Retention,
    SnapshotSchedule,
    Supervision,
)
from supervise.policy.units import Size, UnitError, parse_duration
from supervise.runtime.backoff import Backoff

__all__ = [
    "Backoff",
    "CaptureSchedule",
    "Cluster",
    "Persist",
    "Policy",
    "PolicyError",
    "Problem",
    "Reason",
    "Recovery",
    "Replication",
    "Retention",
    "ScheduleState",
    "Size",
    "SnapshotSchedule",
    "Supervision",
    "UnitError",
    "parse_duration",
]
