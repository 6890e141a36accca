"""Injecting the demo's faults into the running cluster, and what each injection was."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import attrs

from supervise._demo.cluster import DemoCluster, DemoFailure
from supervise._demo.config import FaultKind
from supervise._testing.cluster import fault_file
from supervise._testing.procs import send_signal
from supervise.policy import Policy


@attrs.define(slots=True)
class Injection:
    """One injected fault: what, on which node/rank/PID, when, at which step; and how the
    cluster came back (``resumed_at``: every node completed a step in a newer generation)."""

    index: int
    kind: FaultKind
    node: int
    rank: int
    pids: tuple[int, ...]
    at: float  # wall clock
    step: int  # the newest step training had reported
    generation: int  # the generation that was running
    action: str  # what was done, in words
    limit_s: float  # the most the policy allows from the fault to training resumed
    resumed_at: float | None = None
    resumed_generation: int | None = None
    resumed_step: int | None = None  # the step restored
    replacement_at: float | None = None  # node loss: when the replacement agent started

    @property
    def time_to_resume(self) -> float | None:
        return None if self.resumed_at is None else self.resumed_at - self.at


def target_rank(kind: FaultKind, nodes: int) -> int:
    """Which node (= rank: one worker per node) each fault hits. Never node 0 for a node loss:
    it hosts the rendezvous and coordinates, and losing it is a different story (a new root)."""
    if kind is FaultKind.CRASH:
        return 1 % nodes
    if kind is FaultKind.NAN:
        return 0
    return nodes - 1  # hang, node loss


def resume_limit(kind: FaultKind, policy: Policy, *, worker_shutdown: float) -> float:
    """The longest the policy lets a recovery from ``kind`` take, fault to first step: the
    detection's own timeout, then for every allowed attempt its backoff, stopping the old
    workers and the new workers' startup timeout (plus the replacement agent's start)."""
    r = policy.recovery
    c = policy.cluster
    detect = {
        FaultKind.CRASH: 0.0,
        FaultKind.NAN: 0.0,
        FaultKind.HANG: r.heartbeat_timeout,
        FaultKind.NODE_LOSS: c.peer_timeout,
    }[kind]
    per_attempt = r.backoff.max + worker_shutdown + r.startup_timeout
    slack = 5.0 + (30.0 if kind is FaultKind.NODE_LOSS else 0.0)  # ticks; an agent's start
    return detect + max(1, r.max_attempts) * per_attempt + slack


def inject(
    cluster: DemoCluster,
    kind: FaultKind,
    *,
    index: int,
    faults_dir: Path,
    limit_s: float,
) -> Injection:
    """Inject ``kind`` now; DemoFailure when its target is not running."""
    node = target_rank(kind, cluster.spec.nodes)
    agent = cluster.current(node)
    gen = agent.log.generation
    if gen is None or node not in gen.pids:
        raise DemoFailure(f"cannot inject the {kind.label}: node {node} runs no worker")
    pid = gen.pids[node]
    step = max(
        (a.log.generation.last_step or 0) for a in cluster.live if a.log.generation is not None
    )
    now = time.time()
    if kind is FaultKind.CRASH:
        _signal(pid, signal.SIGKILL, kind)
        pids: tuple[int, ...] = (pid,)
        action = f"kill -9 worker rank {node} (pid {pid})"
    elif kind is FaultKind.HANG:
        _signal(pid, signal.SIGSTOP, kind)
        pids = (pid,)
        action = f"kill -STOP worker rank {node} (pid {pid}): it stays alive, silent"
    elif kind is FaultKind.NODE_LOSS:
        lost, workers = cluster.kill_node(node)
        pids = (lost.pid, *workers)
        worker_text = ", ".join(str(w) for w in workers) or "none"
        action = (
            f"kill -9 agent {node} (pid {lost.pid}) and its worker (pid {worker_text});"
            f" its RAM is gone ({lost.shm_dir.name} wiped)"
        )
    else:
        marker = fault_file(faults_dir, "nan", node)  # supervise._demo.train's fault file
        pids = ()
        action = f"rank {node}'s next loss becomes NaN ({marker.name})"
    return Injection(index, kind, node, node, pids, now, step, gen.number, action, limit_s)


def _signal(pid: int, signum: int, kind: FaultKind) -> None:
    if not send_signal(pid, signum):
        raise DemoFailure(f"cannot inject the {kind.label}: worker pid {pid} is gone")
