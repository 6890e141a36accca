"""The supervised run: start the agents, inject each fault once training is well under way,
wait for training to resume after it, then for training to finish."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import attrs

from supervise._demo.cluster import WORKER_SHUTDOWN_S, DemoCluster, DemoFailure
from supervise._demo.config import DemoConfig, FaultKind
from supervise._demo.faults import Injection, inject, resume_limit
from supervise._demo.result import DemoResult, Narrator
from supervise.policy import Policy


@attrs.frozen(slots=True)
class Running:
    """Every node runs the same generation and has completed a step in it."""

    generation: int
    restored: int  # the step it restarted from (-1: from scratch)
    step: int | None  # the newest step a worker reported
    resumed_at: float  # when the last node completed its first step
    pids: dict[int, int]  # global rank -> worker pid


def running(cluster: DemoCluster) -> Running | None:
    """The cluster's generation when every node trains in it; None while it (re)starts."""
    gens = [a.log.generation for a in cluster.live]
    if not gens:
        return None
    views = [g for g in gens if g is not None and g.resumed_at is not None]
    if len(views) != len(gens) or len({g.number for g in views}) != 1:
        return None
    steps = [g.last_step for g in views if g.last_step is not None]
    return Running(
        generation=views[0].number,
        restored=max(g.step for g in views),
        step=max(steps) if steps else None,
        resumed_at=max(g.resumed_at for g in views if g.resumed_at is not None),
        pids={rank: pid for g in views for rank, pid in g.pids.items()},
    )


async def run_supervised(
    cluster: DemoCluster,
    *,
    config: DemoConfig,
    policy: Policy,
    faults_dir: Path,
    result: DemoResult,
    say: Narrator,
) -> None:
    """Start every agent, inject ``config.faults`` one by one, wait for the end of training.
    DemoFailure when something does not happen within what the policy allows."""
    say(f"starting {config.nodes} node agents")
    for rank in range(config.nodes):
        agent = await cluster.start_agent(rank)
        say(f"  {agent.name}: pid {agent.pid}, arenas in {agent.shm_dir}")
    r = policy.recovery
    per_attempt = r.startup_timeout + r.backoff.max + WORKER_SHUTDOWN_S
    await cluster.wait_for(
        lambda: running(cluster) is not None,
        limit_s=max(1, r.max_attempts) * per_attempt + 60,
        what="training to start on every node",
    )
    state = running(cluster)
    assert state is not None
    result.training_started_at = state.resumed_at
    pids = ", ".join(f"rank {rank}: pid {pid}" for rank, pid in sorted(state.pids.items()))
    say(f"training started (generation {state.generation}); workers {pids}", at=state.resumed_at)
    every = max(1, policy.snapshot.every_steps)
    calm = policy.recovery.backoff.reset_after or 0.0
    for index, kind in enumerate(config.faults):
        threshold = config.threshold(index, every)
        await cluster.wait_for(
            functools.partial(_ready, cluster, threshold, every, calm),
            limit_s=config.steps * (config.step_delay + 0.5) + 120,
            what=f"training to reach step {threshold} before the {kind.label}",
            failed=functools.partial(_finished_early, cluster, kind),
        )
        limit = resume_limit(kind, policy, worker_shutdown=WORKER_SHUTDOWN_S)
        injection = inject(cluster, kind, index=index, faults_dir=faults_dir, limit_s=limit)
        result.injections.append(injection)
        say(
            f"fault {index + 1}/{len(config.faults)}: {kind.label} at step {injection.step}:"
            f" {injection.action}"
        )
        if kind is FaultKind.NODE_LOSS:
            await _replace(cluster, injection, policy, say)
        await _await_resume(cluster, injection, say)
    await _await_finish(cluster, config, result, say)


def _ready(cluster: DemoCluster, threshold: int, every: int, calm: float) -> bool:
    """Training passed ``threshold``, took two snapshots since its last restart, and ran the
    policy's calm period (``backoff.reset_after``: the next recovery starts at attempt 1)."""
    state = running(cluster)
    if state is None or state.step is None or state.step < threshold:
        return False
    return state.step >= state.restored + 2 * every and time.time() - state.resumed_at >= calm


def _finished_early(cluster: DemoCluster, kind: FaultKind) -> str | None:
    if any(a.log.finished_at is not None for a in cluster.live):
        return f"training finished before the {kind.label} could be injected (give it more --steps)"
    return None


async def _replace(
    cluster: DemoCluster, injection: Injection, policy: Policy, say: Narrator
) -> None:
    """Wait for the survivors to declare the node lost, then start its replacement (same rank,
    empty RAM: it must fetch its shard from a group peer)."""
    lost = injection.node
    others = [a for a in cluster.live if a.rank != lost]

    def noticed() -> bool:
        return any(
            at >= injection.at and peer == lost for a in others for at, peer in a.log.peers_lost
        )

    waited = await cluster.wait_for(
        noticed,
        limit_s=policy.cluster.peer_timeout + 30,
        what=f"the other nodes to notice that node {lost} is gone",
    )
    say(
        f"  node {lost} declared lost by its peers after {waited:.1f} s"
        f" (peer_timeout {policy.cluster.peer_timeout:g} s)"
    )
    agent = await cluster.start_agent(lost)
    injection.replacement_at = time.time()
    say(f"  replacement agent for node {lost}: pid {agent.pid}, empty RAM ({agent.shm_dir})")


async def _await_resume(cluster: DemoCluster, injection: Injection, say: Narrator) -> None:
    def resumed() -> bool:
        state = running(cluster)
        return state is not None and state.generation > injection.generation

    await cluster.wait_for(
        resumed,
        limit_s=injection.limit_s,
        what=f"training to resume after the {injection.kind.label} (the policy's limit)",
    )
    state = running(cluster)
    assert state is not None
    injection.resumed_at = state.resumed_at
    injection.resumed_generation = state.generation
    injection.resumed_step = state.restored
    for at, text in _notes(cluster, injection.at, state.resumed_at):
        say(f"  {text}", at=at)
    where = "from scratch" if state.restored < 0 else f"at step {state.restored}"
    say(
        f"  training resumed: generation {state.generation}, every node restored {where},"
        f" {injection.time_to_resume:.1f} s after the fault",
        at=state.resumed_at,
    )


def _notes(cluster: DemoCluster, start: float, end: float) -> list[tuple[float, str]]:
    """What the agents said between a fault and the resume (detections, decisions), once."""
    notes = sorted(
        (n.at, n.text) for a in cluster.agents for n in a.log.notes if start <= n.at <= end
    )
    out: list[tuple[float, str]] = []
    for at, text in notes:
        if all(text != t for _, t in out):
            out.append((at, text))
    return out[:6]


async def _await_finish(
    cluster: DemoCluster, config: DemoConfig, result: DemoResult, say: Narrator
) -> None:
    await cluster.wait_for(
        lambda: all(a.exit is not None for a in cluster.live),
        limit_s=config.steps * (config.step_delay + 0.5) + 300,
        what="training to finish and every agent to exit",
    )
    for agent in cluster.live:
        if agent.exit is None or agent.exit.exit_code != 0:
            raise DemoFailure(f"{agent.name} ended with {agent.exit}, not exit code 0")
    result.training_finished_at = max(a.log.finished_at or time.time() for a in cluster.live)
    say("training finished on every node; every agent exited 0", at=result.training_finished_at)
