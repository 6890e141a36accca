"""supervise: Erlang/OTP-style supervision for distributed PyTorch training.

The public face: everything users import comes from here (private modules, thin face). The
user API comes first — the OTP runtime, policies, snapshot errors, telemetry set-up; the
training side is ``supervise.torch`` (``Snapshotter``). The node agent's building blocks follow
separately: public for those who assemble their own node, but not what a training script needs.
"""

from supervise._validation import InvalidValue
from supervise._version import __version__

# --- user API: the runtime (Erlang/OTP on trio) ---
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

# --- user API: policies, snapshots, telemetry ---
# isort: split
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
    FinishedJob,
    Manifest,
    SnapshotError,
    VersionInfo,
)
from supervise.telemetry import (
    TelemetryError,
    configure_logging,
    setup_telemetry,
    shutdown_telemetry,
)

# --- internals: the node agent's building blocks (data plane, membership, replicas) ---
# isort: split
from supervise.agents.replica_holder import ReplicaHolder
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
from supervise.cluster.failure_detector import (
    DetectorConfig,
    LossCause,
    PeerBack,
    PeerLost,
    RootChanged,
)
from supervise.cluster.membership import Membership
from supervise.cluster.placement import place, recoverable_probability
from supervise.cluster.replica_store import ReplicaStore
from supervise.cluster.replicator import ReplicationService
from supervise.cluster.shard import ShardMeta

# The user API first (a training job, its policy, its supervision tree), then the internals
# (the node agent's building blocks, public for those who assemble a node of their own).
__all__ = [  # noqa: RUF022 -- grouped, not sorted
    # --- user API ---
    # runtime
    "AlreadyPresent",
    "AlreadyRegistered",
    "AlreadyRunning",
    "AutoShutdown",
    "Backoff",
    "CallTimeout",
    "ChildCounts",
    "ChildFailed",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "DynamicSupervisor",
    "DynamicSupervisorRef",
    "ExitKind",
    "ExitReason",
    "GaveUp",
    "NoProc",
    "NotFound",
    "OsProcess",
    "OutputLine",
    "ProcessHandle",
    "Restart",
    "Server",
    "ServerRef",
    "Shutdown",
    "StartFailed",
    "StillRunning",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorRef",
    "TooManyChildren",
    "child",
    "registered",
    "whereis",
    # policies
    "Cluster",
    "InvalidValue",
    "Persist",
    "Policy",
    "PolicyError",
    "Recovery",
    "Replication",
    "Retention",
    "Size",
    "SnapshotSchedule",
    "Supervision",
    # snapshots
    "CapacityError",
    "CorruptSnapshot",
    "FinishedJob",
    "Manifest",
    "SnapshotError",
    "VersionInfo",
    # telemetry
    "TelemetryError",
    "configure_logging",
    "setup_telemetry",
    "shutdown_telemetry",
    "__version__",
    # --- internals ---
    "ClusterError",
    "CurveKeys",
    "DetectorConfig",
    "Incoming",
    "LossCause",
    "Membership",
    "PeerBack",
    "PeerLost",
    "ProtocolError",
    "RemoteError",
    "ReplicaHolder",
    "ReplicaStore",
    "ReplicationService",
    "Reply",
    "RequestTimeout",
    "RootChanged",
    "ShardMeta",
    "Transport",
    "TransportLimits",
    "generate_keys",
    "message_kind",
    "place",
    "recoverable_probability",
]
