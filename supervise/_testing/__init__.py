"""Test helpers for supervise and for tests built on it (not public API).

``LocalCluster``: real ``supervise node`` agents on free loopback ports; reads their JSON logs,
injects faults, waits on conditions and cleans up every process by PID (``cluster``).
``wait_until`` / ``wait_until_async``: the one polling helper, a condition and a deadline,
``WaitTimeout`` naming what was awaited (``poll``). ``PidBook``: processes by PID and start
time (``procs``). ``OtelCollector``: a real collector (rotel) on loopback whose received spans
and metrics a test can read; the node-agent tests use it through the ``otel_collector`` fixture.
"""

from supervise._testing.cluster import (
    Agent,
    LocalCluster,
    fault_file,
    kill_node,
    node_argv,
    read_json_lines,
)
from supervise._testing.collector import OtelCollector
from supervise._testing.otlp_sink import (
    OtlpSink,
    ReceivedEvent,
    ReceivedMetric,
    ReceivedPoint,
    ReceivedSpan,
)
from supervise._testing.poll import WaitTimeout, wait_until, wait_until_async
from supervise._testing.procs import (
    PidBook,
    SeenProcess,
    free_port,
    free_ports,
    pid_alive,
    send_signal,
    sweep,
)

__all__ = [
    "Agent",
    "LocalCluster",
    "OtelCollector",
    "OtlpSink",
    "PidBook",
    "ReceivedEvent",
    "ReceivedMetric",
    "ReceivedPoint",
    "ReceivedSpan",
    "SeenProcess",
    "WaitTimeout",
    "fault_file",
    "free_port",
    "free_ports",
    "kill_node",
    "node_argv",
    "pid_alive",
    "read_json_lines",
    "send_signal",
    "sweep",
    "wait_until",
    "wait_until_async",
]
