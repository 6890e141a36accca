"""Recovery traces end to end: real node agents (`supervise node`) train demo_train under a
real collector (rotel on loopback); a real failure is injected; what ARRIVED at the collector
is checked against the telemetry contract (DESIGN.md §4): span names, one trace across nodes,
every phase a child of the one root, the root's events in order, the attributes; capture /
replicate / persist spans; metrics; and trace ids on the agents' JSON log lines.

The agents export spans only when they exit (``OTEL_BSP_SCHEDULE_DELAY`` is longer than any
test), so every span found here also proves the flush on that exit path: training finished
(exit 0), SIGTERM after a recovery and during one (143), recovery gave up (3). Processes are
cleaned up by PID, also when a test fails; nothing here asserts on timing (only on the order
of causally ordered events).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervise._testing import Agent, LocalCluster, OtelCollector, ReceivedSpan, wait_until

pytestmark = pytest.mark.slow

RECOVERY = "supervise.recovery"
PHASE = {p: f"{RECOVERY}.{p}" for p in ("detect", "select_checkpoint", "fetch", "restore")}
PHASE["resume"] = f"{RECOVERY}.resume"
CONTRACT_EVENTS = ("detected", "started", "checkpoint_selected", "restored")
OUTCOMES = ("completed", "failed", "exhausted")
SNAP = "supervise.snapshot."
A = "supervise."  # attribute prefix
STATUS_ERROR = 2  # OTLP status code of a span that failed or was cut short

STEPS = 60
UNENDING = 100_000  # for tests that end the job with SIGTERM: it must not finish first
EVERY = 5  # snapshot.every_steps
WAIT = 240.0  # generous: a loaded 2-core machine starting torch workers

POLICY = """
[snapshot]
every_steps = {every}
[recovery]
max_attempts = {max_attempts}
heartbeat_timeout = 60.0
startup_timeout = 120.0
[recovery.backoff]
initial = 0.1
max = 0.5
jitter = 0.0
[persist]
every_snapshots = {persist}
path = "{persist_path}"
[cluster]
heartbeat_interval = 0.2
peer_timeout = 5.0
rejoin_timeout = 120.0
"""


class Cluster(LocalCluster):
    """Node agents of one test on loopback, training ``supervise._demo.train``, exporting to
    the test's collector; every process is stopped by PID at the end."""

    def __init__(
        self,
        tmp: Path,
        collector: OtelCollector,
        n: int,
        *,
        persist: int = 0,
        max_attempts: int = 3,
        steps: int = STEPS,
        cold: bool = False,
    ) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        super().__init__(
            tmp,
            n,
            command=[
                sys.executable,
                "-m",
                "supervise._demo.train",
                "--steps",
                str(steps),
                "--step-delay",
                "0.05",
                "--hidden",
                "256",
            ],
            policy=POLICY.format(
                every=EVERY,
                max_attempts=max_attempts,
                persist=persist,
                persist_path=tmp / "checkpoints",
            ).replace("[recovery]\n", "[recovery]\npreload = []\n" if cold else "[recovery]\n"),
            env={
                **clean,
                **collector.env(metric_export_interval_ms=1000),
                "OTEL_BSP_SCHEDULE_DELAY": "3600000",  # spans leave only with the exit flush
                "PYTHONUNBUFFERED": "1",
            },
            inherit_env=False,
            worker_shutdown=3.0,
            wait_s=WAIT,
        )

    def replicated(self, holder: Agent, rank: int, at_least: int) -> bool:
        """``holder`` stored a replica of ``rank``'s shard at version >= ``at_least``."""
        for line in holder.events("replica stored"):
            m = re.fullmatch(r"rank (\d+) v(\d+) g\d+", str(line.get("shard")))
            if m and int(m[1]) == rank and int(m[2]) >= at_least:
                return True
        return False


@pytest.fixture
def cluster_factory(
    tmp_path: Path, otel_collector: OtelCollector
) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(n: int, **kwargs: Any) -> Cluster:
        cluster = Cluster(tmp_path, otel_collector, n, **kwargs)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.cleanup()
            print(cluster.dump())  # shown by pytest when the test failed


# ---- checking what arrived ----------------------------------------------------------------


def _arrived(collector: OtelCollector) -> str:
    """What reached the collector: (node, pid, span name) -> how many, and the metric names."""
    counts = Counter(
        (s.resource.get(A + "node.rank"), s.resource.get("process.pid"), s.name)
        for s in collector.spans()
    )
    spans = "\n".join(f"  {key}: {n}" for key, n in sorted(counts.items(), key=str))
    metrics = sorted({m.name for m in collector.metrics()})
    return f"spans that arrived (node, pid, name): count\n{spans}\nmetrics: {metrics}"


def _completed_ops(collector: OtelCollector, agent: Agent) -> set[str]:
    """The snapshot operations of which ``agent`` sent a completed span that moved bytes."""
    return {
        s.name.removeprefix(SNAP)
        for s in collector.spans()
        if s.name.startswith(SNAP)
        and s.resource.get("process.pid") == agent.pid
        and s.status_code != STATUS_ERROR
        and s.attributes.get(A + "bytes")
    }


def _recovery_roots(
    collector: OtelCollector, triggers: set[str], outcome: str
) -> list[ReceivedSpan]:
    return [
        s
        for s in collector.spans(RECOVERY)
        if s.attributes.get(A + "trigger") in triggers
        and s.attributes.get(A + "recovery.outcome") == outcome
    ]


def _flushed(
    collector: OtelCollector,
    *,
    triggers: set[str],
    outcome: str,
    phases: dict[str, list[Agent] | None],
    agents: list[Agent],
    ops: tuple[str, ...],
    metrics: bool = False,
    memory: bool = False,
) -> bool:
    """Whether everything the checks read from the agents' exit flushes arrived: the recovery
    root; each phase of its trace from each agent named (None: from any process); each
    agent's completed snapshot spans of ``ops``; (``metrics``) each agent's steps, the
    recovery's duration and (``memory``) the memory held of both kinds."""
    roots = _recovery_roots(collector, triggers, outcome)
    if not roots:
        return False
    in_trace = [s for r in roots for s in collector.spans(trace_id=r.trace_id)]
    for phase, senders in phases.items():
        pids = {s.resource.get("process.pid") for s in in_trace if s.name == PHASE[phase]}
        if not pids or (senders is not None and not {a.pid for a in senders} <= pids):
            return False
    if not all(set(ops) <= _completed_ops(collector, a) for a in agents):
        return False
    if not metrics:
        return True
    if not any(
        p.attributes.get(A + "recovery.outcome") == outcome
        for p in _points(collector, "supervise.recovery.duration")
    ):
        return False
    for agent in agents:
        if not any(p.value > 0 for p in _points(collector, "supervise.training.steps", agent.pid)):
            return False
        held = {
            p.attributes.get(A + "memory.kind")
            for p in _points(collector, "supervise.memory.held", agent.pid)
            if p.value > 0
        }
        if memory and not {"arena", "replica"} <= held:
            return False
    return True


def _the_recovery(
    collector: OtelCollector,
    triggers: set[str],
    outcome: str,
    *,
    phases: dict[str, list[Agent] | None],
    agents: list[Agent],
    ops: tuple[str, ...],
    metrics: bool = False,
    memory: bool = False,
) -> ReceivedSpan:
    """The one recovery root with this outcome (called once the agents exited). Waits for
    what their exit flushes must have brought (see ``_flushed``), then stops rotel: it
    flushes what it still holds, so nothing that arrives later can be missed below."""
    wait_until(
        functools.partial(
            _flushed,
            collector,
            triggers=triggers,
            outcome=outcome,
            phases=phases,
            agents=agents,
            ops=ops,
            metrics=metrics,
            memory=memory,
        ),
        what=(
            f"the {outcome} recovery ({', '.join(sorted(triggers))}), its phases"
            f" {sorted(phases)}, the {ops} spans of nodes {[a.rank for a in agents]}"
            + (" and their metrics" if metrics else "")
            + " at the collector"
        ),
        timeout_s=60.0,
        interval_s=0.1,
        details=lambda: _arrived(collector),
    )
    assert collector.rotel is not None
    collector.rotel.stop()  # SIGTERM: rotel exports what it still holds, then exits
    roots = _recovery_roots(collector, triggers, outcome)
    seen = [
        (s.attributes.get(A + "trigger"), s.attributes.get(A + "recovery.outcome"))
        for s in collector.spans(RECOVERY)
    ]
    assert len(roots) == 1, f"recoveries that arrived (trigger, outcome): {seen}"
    return roots[0]


def _by_node(spans: list[ReceivedSpan], name: str) -> dict[int, ReceivedSpan]:
    found: dict[int, ReceivedSpan] = {}
    for s in spans:
        if s.name == name:
            rank = s.attributes[A + "node.rank"]
            assert isinstance(rank, int)
            assert rank not in found, f"two {name} spans from node {rank}"
            found[rank] = s
    return found


def check_recovery_trace(
    collector: OtelCollector,
    root: ReceivedSpan,
    *,
    coordinator: Agent,
    restarted: dict[int, Agent],
    sources: dict[int, str],
    fetched: dict[int, Agent],
) -> int:
    """The contract tree of one completed recovery; returns the version it restarted at.

    ``restarted``: node rank -> the agent process that restored and resumed there;
    ``sources``: node rank -> the restore's snapshot.source; ``fetched``: nodes that fetched.
    """
    # -- the root: on the coordinator, a trace of its own, attributes of the whole recovery
    assert root.is_root
    assert root.resource[A + "node.rank"] == coordinator.rank
    assert root.resource["process.pid"] == coordinator.pid
    assert root.resource["service.name"] == "supervise"
    assert root.scope == "supervise"
    assert root.status_code == 1, root.status_message  # OK
    attrs = root.attributes
    version = attrs[A + "snapshot.version"]
    assert isinstance(version, int) and version >= EVERY, attrs  # restored, not a fresh start
    assert version % EVERY == 0
    assert attrs[A + "snapshot.step"] == version
    assert attrs[A + "snapshot.source"] in ("local", "peer", "disk")
    assert isinstance(attrs[A + "bytes"], int) and attrs[A + "bytes"] > 0
    assert attrs[A + "node.rank"] == coordinator.rank
    assert attrs[A + "attempt"] == 1
    assert attrs[A + "generation"] == 2
    # events: the contract's, in order, the outcome last
    names = root.event_names
    assert [n for n in names if n in CONTRACT_EVENTS] == list(CONTRACT_EVENTS), names
    assert names[-1] == "completed" and not set(names) & {"failed", "exhausted"}, names
    selected = next(e for e in root.events if e.name == "checkpoint_selected")
    assert selected.attributes[A + "snapshot.version"] == version
    assert selected.attributes[A + "snapshot.source"] == attrs[A + "snapshot.source"]
    assert selected.attributes[A + "bytes"] == attrs[A + "bytes"]

    # -- every other span of the trace is a phase, a child of the root
    spans = [s for s in collector.spans(trace_id=root.trace_id) if s.span_id != root.span_id]
    for s in spans:
        assert s.name in PHASE.values(), s.name
        assert s.parent_span_id == root.span_id, (s.name, s.attributes)
        assert s.attributes[A + "trigger"] == attrs[A + "trigger"]
        assert s.attributes[A + "attempt"] == 1
        assert s.status_code != 2, (s.name, s.status_message)
        assert root.start_unix_nano <= s.start_unix_nano <= s.end_unix_nano <= root.end_unix_nano
    for name in ("detect", "select_checkpoint"):
        (only,) = [s for s in spans if s.name == PHASE[name]]
        assert only.resource["process.pid"] == coordinator.pid
        assert only.attributes[A + "node.rank"] == coordinator.rank
    detect = next(s for s in spans if s.name == PHASE["detect"])
    select = next(s for s in spans if s.name == PHASE["select_checkpoint"])
    assert detect.start_unix_nano == root.start_unix_nano  # backdated to the failure's evidence
    assert detect.end_unix_nano <= select.start_unix_nano
    assert select.attributes[A + "snapshot.version"] == version
    assert select.attributes[A + "snapshot.source"] == attrs[A + "snapshot.source"]

    # -- fetch / restore / resume on every node, from that node's own process: one trace
    restores = _by_node(spans, PHASE["restore"])
    resumes = _by_node(spans, PHASE["resume"])
    fetches = _by_node(spans, PHASE["fetch"])
    assert set(restores) == set(resumes) == set(restarted)
    assert set(fetches) == set(fetched)
    for node, agent in restarted.items():
        restore, resume = restores[node], resumes[node]
        for s in (restore, resume):
            assert s.resource["process.pid"] == agent.pid, s.name
            assert s.resource[A + "node.rank"] == node
        assert restore.attributes[A + "snapshot.version"] == version
        assert restore.attributes[A + "snapshot.step"] == version
        assert restore.attributes[A + "snapshot.source"] == sources[node]
        assert isinstance(restore.attributes[A + "bytes"], int)
        assert restore.attributes[A + "bytes"] > 0
        assert resume.attributes[A + "snapshot.step"] == version
        assert select.end_unix_nano <= restore.start_unix_nano
        assert restore.end_unix_nano <= resume.start_unix_nano
        if node in fetches:
            fetch = fetches[node]
            assert fetch.resource["process.pid"] == fetched[node].pid
            assert fetch.attributes[A + "snapshot.source"] == sources[node]
            assert fetch.attributes[A + "snapshot.version"] == version
            assert fetch.attributes[A + "bytes"] == restore.attributes[A + "bytes"]
            assert select.end_unix_nano <= fetch.start_unix_nano
            assert fetch.end_unix_nano <= restore.start_unix_nano
    return version


def check_snapshot_spans(
    collector: OtelCollector, agents: list[Agent], ops: tuple[str, ...]
) -> None:
    """Every agent sent capture (its workers'), replicate (and persist) spans, each its own
    trace, with the contract's attributes. A push cut short (its peer lost, a newer version,
    shutdown) is an error span that claims no bytes; every agent moved bytes in each op."""
    for op in ops:
        spans = collector.spans(SNAP + op)
        for agent in agents:
            mine = [s for s in spans if s.resource["process.pid"] == agent.pid]
            moved = [
                s for s in mine if s.status_code != STATUS_ERROR and s.attributes.get(A + "bytes")
            ]
            assert moved, f"no completed {SNAP + op} span from node {agent.rank} ({agent.pid})"
            for s in mine:
                a = s.attributes
                assert s.is_root, s.name
                assert a[A + "node.rank"] == agent.rank
                assert isinstance(a[A + "snapshot.version"], int)
                assert a[A + "snapshot.version"] % EVERY == 0
                if s.status_code == STATUS_ERROR:
                    assert s.status_message, s
                    assert op != "replicate" or A + "bytes" not in a, s
                else:  # 0: the peer already held that version, nothing was sent
                    assert isinstance(a[A + "bytes"], int)
                    assert a[A + "bytes"] > 0 or (op == "replicate" and a[A + "bytes"] == 0), s
                if op == "replicate":
                    assert a[A + "peer.rank"] != agent.rank
                else:  # capture, persist: the training rank (one per node here)
                    assert a[A + "rank"] == agent.rank
                    assert a[A + "snapshot.step"] == a[A + "snapshot.version"]


def _points(collector: OtelCollector, name: str, pid: int | None = None) -> list[Any]:
    return [
        p
        for m in collector.metrics(name)
        if pid is None or m.resource.get("process.pid") == pid
        for p in m.points
    ]


def check_metrics(
    collector: OtelCollector,
    agents: list[Agent],
    trigger: str,
    outcome: str,
    ops: set[str],
    *,
    memory: bool = True,
) -> None:
    """Durations, bytes, throughput, training steps and (``memory``: the run lasted a few
    export intervals) memory held arrived."""
    durations = _points(collector, "supervise.recovery.duration")
    assert any(
        p.attributes.get(A + "trigger") == trigger
        and p.attributes.get(A + "recovery.outcome") == outcome
        and p.count >= 1
        and p.sum > 0
        for p in durations
    ), durations
    assert any(
        p.attributes.get(A + "recovery.outcome") == outcome and p.value >= 1
        for p in _points(collector, "supervise.recovery.count")
    )
    phases = {
        p.attributes.get(A + "recovery.phase")
        for p in _points(collector, "supervise.recovery.phase.duration")
    }
    assert {"detect", "select_checkpoint"} <= phases, phases
    moved = {
        p.attributes.get(A + "snapshot.operation")
        for p in _points(collector, "supervise.snapshot.io")
        if p.value > 0
    }
    assert ops <= moved, moved
    assert {
        p.attributes.get(A + "snapshot.operation")
        for p in _points(collector, "supervise.snapshot.throughput")
    } >= ops - {"restore", "fetch"}
    assert {
        p.attributes.get(A + "snapshot.operation")
        for p in _points(collector, "supervise.snapshot.duration")
    } >= {"capture", "replicate"}
    for agent in agents:
        steps = _points(collector, "supervise.training.steps", agent.pid)
        assert steps and max(p.value for p in steps) > 0, agent.rank
        if not memory:
            continue
        held = {
            p.attributes.get(A + "memory.kind")
            for p in _points(collector, "supervise.memory.held", agent.pid)
            if p.value > 0
        }
        assert held == {"arena", "replica"}, (agent.rank, held)


def check_logs(agent: Agent, trace_id: str, *events: str) -> None:
    """The agent's JSON lines of the recovery carry its trace id; its workers' output not."""
    for event in events:
        lines = [x for x in agent.events(event) if x.get("generation") in (None, 2)]
        assert lines, f"node {agent.rank} logged no {event!r}"
        for line in lines:
            assert line.get("trace_id") == trace_id, (agent.rank, line)
            assert re.fullmatch(r"[0-9a-f]{16}", str(line.get("span_id"))), line
    output = [x for x in agent.events("process_output") if "gen 2" in str(x.get("child"))]
    assert all("trace_id" not in x for x in output)


# ---- the tests ----------------------------------------------------------------------------


def test_worker_crash_is_one_trace_across_nodes(cluster_factory, otel_collector) -> None:
    """kill -9 of a worker on node 1 -> one recovery from local RAM, traced on both nodes;
    training finishes, both agents exit 0 and flush."""
    cluster = cluster_factory(2, persist=2)
    agents = [cluster.start(0), cluster.start(1)]
    victim = cluster.worker_pid(1, generation=1)
    cluster.wait(
        f"both shards replicated at version >= {EVERY}",
        lambda: cluster.replicated(agents[0], 1, EVERY) and cluster.replicated(agents[1], 0, EVERY),
    )
    os.kill(victim, signal.SIGKILL)
    assert [cluster.wait_exit(a) for a in agents] == [0, 0], cluster.dump()

    root = _the_recovery(
        otel_collector,
        {"worker_exit"},
        "completed",
        phases={
            "detect": [agents[0]],
            "select_checkpoint": [agents[0]],
            "restore": agents,
            "resume": agents,
        },
        agents=agents,
        ops=("capture", "replicate", "persist"),
        metrics=True,
        memory=True,
    )
    assert root.attributes[A + "snapshot.source"] == "local"
    detected = next(e for e in root.events if e.name == "detected")
    assert f"pid={victim}" in str(detected.attributes[A + "reason"])
    # the training rank that failed, on the root and its detected event
    assert root.attributes[A + "rank"] == detected.attributes[A + "rank"] == 1
    check_recovery_trace(
        otel_collector,
        root,
        coordinator=agents[0],
        restarted={0: agents[0], 1: agents[1]},
        sources={0: "local", 1: "local"},
        fetched={},
    )
    check_snapshot_spans(otel_collector, agents, ("capture", "replicate", "persist"))
    check_metrics(
        otel_collector,
        agents,
        "worker_exit",
        "completed",
        {"capture", "replicate", "persist", "restore"},
    )
    check_logs(
        agents[0], root.trace_id, "recovery", "restart sent", "workers started", "training resumed"
    )
    check_logs(agents[1], root.trace_id, "workers started", "training resumed")


def test_node_loss_fetches_from_a_peer_and_sigterm_flushes(cluster_factory, otel_collector) -> None:
    """kill -9 of node 1's agent (its worker goes with it), a replacement agent with empty RAM
    -> it fetches its shard from node 0's replica; the trace spans the coordinator and the
    replacement process. Then SIGTERM ends both agents (143), and they flush."""
    cluster = cluster_factory(2, steps=UNENDING)
    agents = [cluster.start(0), cluster.start(1)]
    cluster.worker_pid(1, generation=1)
    cluster.wait(
        f"node 0 holding rank 1's shard at version >= {EVERY}",
        lambda: cluster.replicated(agents[0], 1, EVERY),
    )
    cluster.kill_agent(agents[1])
    replacement = cluster.start(1)
    cluster.wait(
        "the replacement's first capture after the recovery, replicated",
        lambda: any(
            re.fullmatch(r"rank 1 v\d+ g2", str(x.get("shard")))
            for x in replacement.events("pushed")
        ),
    )
    # and node 0's push to the replacement arrived, and its metrics reported holding it
    cluster.wait(
        "the replacement reporting a replica held",
        lambda: any(
            p.attributes.get(A + "memory.kind") == "replica" and p.value > 0
            for p in _points(otel_collector, "supervise.memory.held", replacement.pid)
        ),
    )
    for agent in (agents[0], replacement):
        os.kill(agent.pid, signal.SIGTERM)
    codes = [cluster.wait_exit(a) for a in (agents[0], replacement)]
    assert codes == [128 + signal.SIGTERM] * 2, cluster.dump()

    # peer loss, or node 0's worker noticing its peer's death first: one recovery either way
    root = _the_recovery(
        otel_collector,
        {"peer_lost", "worker_exit"},
        "completed",
        phases={
            "detect": [agents[0]],
            "select_checkpoint": [agents[0]],
            "fetch": [replacement],
            "restore": [agents[0], replacement],
            "resume": [agents[0], replacement],
        },
        agents=[agents[0], replacement],
        ops=("capture", "replicate"),
        metrics=True,
        memory=True,
    )
    assert root.attributes[A + "snapshot.source"] == "peer"
    check_recovery_trace(
        otel_collector,
        root,
        coordinator=agents[0],
        restarted={0: agents[0], 1: replacement},
        sources={0: "local", 1: "peer"},
        fetched={1: replacement},
    )
    check_snapshot_spans(otel_collector, [agents[0], replacement], ("capture", "replicate"))
    check_metrics(
        otel_collector,
        [agents[0], replacement],
        str(root.attributes[A + "trigger"]),
        "completed",
        {"capture", "replicate", "fetch", "restore"},
    )
    check_logs(agents[0], root.trace_id, "recovery", "restart sent", "workers started")
    check_logs(replacement, root.trace_id, "shard fetched from a peer", "workers started")


def test_exhausted_recovery_is_traced_and_flushed_on_giving_up(
    cluster_factory, otel_collector
) -> None:
    """recovery.max_attempts = 1: the restarted worker is killed again before its first step
    -> the recovery is exhausted, every agent gives up (exit 3) and still flushes the trace."""
    # cold workers: a warm (forked) spare can restore and step before the test's second kill,
    # and the recovery completes instead of being exhausted
    cluster = cluster_factory(2, max_attempts=1, cold=True)
    agents = [cluster.start(0), cluster.start(1)]
    victim = cluster.worker_pid(1, generation=1)
    cluster.wait(
        f"both shards replicated at version >= {EVERY}",
        lambda: cluster.replicated(agents[0], 1, EVERY) and cluster.replicated(agents[1], 0, EVERY),
    )
    os.kill(victim, signal.SIGKILL)
    again = cluster.worker_pid(1, generation=2)  # importing torch: seconds from a step
    os.kill(again, signal.SIGKILL)
    assert [cluster.wait_exit(a) for a in agents] == [3, 3], cluster.dump()

    root = _the_recovery(
        otel_collector,
        {"worker_exit"},
        "exhausted",
        phases={"detect": None, "select_checkpoint": None},
        agents=agents,
        ops=("capture", "replicate"),
        metrics=True,
    )
    assert root.status_code == 2  # ERROR
    assert "exhausted" in root.status_message
    names = root.event_names
    assert names[:3] == ["detected", "started", "checkpoint_selected"], names
    assert names[-1] == "exhausted" and "completed" not in names, names
    exhausted = root.events[-1] if root.events[-1].name == "exhausted" else None
    assert exhausted is not None
    assert "recovery.max_attempts = 1" in str(exhausted.attributes[A + "reason"])
    phases = [s for s in otel_collector.spans(trace_id=root.trace_id) if s.span_id != root.span_id]
    assert {s.parent_span_id for s in phases} == {root.span_id}
    assert {s.name for s in phases} >= {PHASE["detect"], PHASE["select_checkpoint"]}
    check_snapshot_spans(otel_collector, agents, ("capture", "replicate"))  # node 1 flushed too
    check_metrics(
        otel_collector, agents, "worker_exit", "exhausted", {"capture", "replicate"}, memory=False
    )
    for agent in agents:
        (line,) = agent.events("giving up")
        assert "exhausted" in line["reason"]


def test_sigterm_during_a_recovery_ends_it_failed_and_flushes(
    cluster_factory, otel_collector
) -> None:
    """SIGTERM to every agent while the restarted workers are still starting: the recovery's
    root is ended (failed, the stop recorded) and exported with its phases, not lost open."""
    cluster = cluster_factory(2, cold=True)  # cold workers: the restart is still under way
    agents = [cluster.start(0), cluster.start(1)]
    victim = cluster.worker_pid(1, generation=1)
    cluster.wait(
        f"both shards replicated at version >= {EVERY}",
        lambda: cluster.replicated(agents[0], 1, EVERY) and cluster.replicated(agents[1], 0, EVERY),
    )
    os.kill(victim, signal.SIGKILL)
    cluster.worker_pid(1, generation=2)  # the restart is under way: importing torch
    for agent in agents:
        os.kill(agent.pid, signal.SIGTERM)
    codes = [cluster.wait_exit(a) for a in agents]
    assert codes == [128 + signal.SIGTERM] * 2, cluster.dump()

    root = _the_recovery(
        otel_collector,
        {"worker_exit"},
        "failed",
        phases={"detect": None, "select_checkpoint": None},
        agents=agents,
        ops=("capture", "replicate"),
    )
    assert root.status_code == 2  # ERROR
    names = root.event_names
    assert names[:3] == ["detected", "started", "checkpoint_selected"], names
    assert names[-1] == "failed" and "completed" not in names, names
    assert root.events[-1].name == "failed"
    assert root.events[-1].attributes["exception.type"] == "Cancelled"
    phases = [s for s in otel_collector.spans(trace_id=root.trace_id) if s.span_id != root.span_id]
    assert {s.parent_span_id for s in phases} == {root.span_id}
    assert {s.name for s in phases} >= {PHASE["detect"], PHASE["select_checkpoint"]}
    assert all(s.end_unix_nano <= root.end_unix_nano for s in phases)
    check_snapshot_spans(otel_collector, agents, ("capture", "replicate"))


@pytest.mark.parametrize("lost", [1, 0], ids=["a node", "the coordinator"])
def test_a_standby_takeover_is_the_same_recovery_trace(
    cluster_factory, otel_collector, lost: int
) -> None:
    """kill -9 of a node's agent (node 1, or node 0: the coordinator) with a hot standby
    waiting (no replacement started): the standby takes the rank, fetches its shard from the
    survivor; one trace across the (surviving) coordinator and the standby, with the phases of
    DESIGN §4 and a ``standby_assigned`` event, in one attempt."""
    kept = 1 - lost
    cluster = cluster_factory(2, steps=UNENDING)
    agents = [cluster.start(0), cluster.start(1)]
    standby = cluster.start_standby()
    cluster.worker_pid(lost, generation=1)
    cluster.wait("the standby waiting", lambda: standby.events("standby waiting"))
    cluster.wait(
        f"node {kept} holding rank {lost}'s shard at version >= {EVERY}",
        lambda: cluster.replicated(agents[kept], lost, EVERY),
    )
    cluster.kill_agent(agents[lost])
    assert cluster.wait_took_over(standby) == lost
    cluster.wait(
        "the standby's first capture after the recovery, replicated",
        lambda: any(
            re.fullmatch(rf"rank {lost} v\d+ g[2-9]", str(x.get("shard")))
            for x in standby.events("pushed")
        ),
    )
    for agent in (agents[kept], standby):
        os.kill(agent.pid, signal.SIGTERM)
    codes = [cluster.wait_exit(a) for a in (agents[kept], standby)]
    assert codes == [128 + signal.SIGTERM] * 2, cluster.dump()

    root = _the_recovery(
        otel_collector,
        {"peer_lost", "worker_exit"},
        "completed",
        phases={
            "detect": [agents[kept]],
            "select_checkpoint": [agents[kept]],
            "fetch": [standby],
            "restore": [agents[kept], standby],
            "resume": [agents[kept], standby],
        },
        agents=[agents[kept], standby],
        ops=("capture", "replicate"),
    )
    assert root.attributes[A + "snapshot.source"] == "peer"
    assert "standby_assigned" in root.event_names
    check_recovery_trace(
        otel_collector,
        root,
        coordinator=agents[kept],
        restarted={kept: agents[kept], lost: standby},
        sources={kept: "local", lost: "peer"},
        fetched={lost: standby},
    )
