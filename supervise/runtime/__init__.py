"""Erlang/OTP on trio: supervisors, servers, a registry and OS-process children.

Knows nothing of torch, zmq or training.
"""

from supervise.runtime._pdeathsig import child_subreaper, set_child_subreaper
from supervise.runtime._spawn import Spawned, adopt
from supervise.runtime.backoff import Backoff
from supervise.runtime.dynamic import DynamicSupervisor, DynamicSupervisorRef
from supervise.runtime.errors import (
    AlreadyPresent,
    AlreadyRegistered,
    AlreadyRunning,
    CallTimeout,
    ChildFailed,
    GaveUp,
    NoProc,
    NotFound,
    Shutdown,
    StartFailed,
    StillRunning,
    SupervisorError,
    TooManyChildren,
)
from supervise.runtime.exit import ExitKind, ExitReason
from supervise.runtime.osprocess import OsProcess, OutputLine, ProcessHandle, Spawner, guard_pid
from supervise.runtime.registry import registered, whereis
from supervise.runtime.server import Server, ServerRef
from supervise.runtime.spec import (
    AutoShutdown,
    ChildCounts,
    ChildInfo,
    ChildSpec,
    ChildState,
    Restart,
    Strategy,
    child,
)
from supervise.runtime.supervisor import Supervisor, SupervisorRef

__all__ = [
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
    "Spawned",
    "Spawner",
    "StartFailed",
    "StillRunning",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorRef",
    "TooManyChildren",
    "adopt",
    "child",
    "child_subreaper",
    "guard_pid",
    "registered",
    "set_child_subreaper",
    "whereis",
]
