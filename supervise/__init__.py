"""supervise: Erlang/OTP-style supervision for distributed PyTorch training.

The public face: everything users import comes from here (private modules, thin face).
"""

from supervise._validation import InvalidValue
from supervise._version import __version__

# --- runtime ---
from supervise.runtime import (
    AlreadyPresent,
    AlreadyRegistered,
    AlreadyRunning,
    AutoShutdown,
    Backoff,
    CallTimeout,
    ChildCounts,
    ChildFailed,
    ChildInfo,
    ChildSpec,
    ChildState,
    DynamicSupervisor,
    DynamicSupervisorRef,
    ExitKind,
    ExitReason,
    GaveUp,
    NoProc,
    NotFound,
    OsProcess,
    OutputLine,
    ProcessHandle,
    Restart,
    Server,
    ServerRef,
    Shutdown,
    StartFailed,
    StillRunning,
    Strategy,
    Supervisor,
    SupervisorError,
    SupervisorRef,
    TooManyChildren,
    child,
    registered,
    whereis,
)

# --- policy ---
# isort: split
# --- agents ---
from supervise.agents.replica_holder import ReplicaHolder

# --- snapshot ---
# --- cluster ---
from supervise.cluster import (
    ClusterError,
    CurveKeys,
    Incoming,
    ProtocolError,
    RemoteError,
    Reply,
    RequestTimeout,
    Transport,
    TransportLimits,
    generate_keys,
    message_kind,
)
from supervise.cluster.failure_detector import DetectorConfig, PeerBack, PeerLost, RootChanged
from supervise.cluster.membership import Membership
from supervise.cluster.placement import place, recoverable_probability
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.replicator import ReplicationService
from supervise.cluster.shard import ShardMeta
from supervise.policy import (
    Cluster,
    Persist,
    Policy,
    PolicyError,
    Recovery,
    Replication,
    Retention,
    Size,
    SnapshotSchedule,
    Supervision,
)
from supervise.snapshot import (
    CapacityError,
    CorruptSnapshot,
    Manifest,
    SnapshotError,
    VersionInfo,
)

# --- telemetry ---
from supervise.telemetry import (
    TelemetryError,
    configure_logging,
    setup_telemetry,
    shutdown_telemetry,
)

__all__ = [
    "AlreadyPresent",
    "AlreadyRegistered",
    "AlreadyRunning",
    "AutoShutdown",
    "Backoff",
    "CallTimeout",
    "CapacityError",
    "ChildCounts",
    "ChildFailed",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "Cluster",
    "ClusterError",
    "CorruptSnapshot",
    "CurveKeys",
    "DetectorConfig",
    "DynamicSupervisor",
    "DynamicSupervisorRef",
    "ExitKind",
    "ExitReason",
    "GaveUp",
    "Incoming",
    "InvalidValue",
    "Manifest",
    "Membership",
    "NoProc",
    "NotFound",
    "OsProcess",
    "OutputLine",
    "PeerBack",
    "PeerLost",
    "Persist",
    "Policy",
    "PolicyError",
    "ProcessHandle",
    "ProtocolError",
    "Recovery",
    "RemoteError",
    "ReplicaHolder",
    "ReplicaStore",
    "Replication",
    "ReplicationService",
    "Reply",
    "RequestTimeout",
    "Restart",
    "Retention",
    "RootChanged",
    "Server",
    "ServerRef",
    "ShardMeta",
    "Shutdown",
    "Size",
    "SnapshotError",
    "SnapshotSchedule",
    "StartFailed",
    "StillRunning",
    "Strategy",
    "Supervision",
    "Supervisor",
    "SupervisorError",
    "SupervisorRef",
    "TelemetryError",
    "TooManyChildren",
    "Transport",
    "TransportLimits",
    "VersionInfo",
    "__version__",
    "child",
    "configure_logging",
    "generate_keys",
    "message_kind",
    "place",
    "recoverable_probability",
    "registered",
    "setup_telemetry",
    "shutdown_telemetry",
    "whereis",
]
