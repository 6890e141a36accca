"""Who owns a Snapshotter's arena: the node agent (``SUPERVISE_AGENT`` set) or this process.

Also reads this process's identity (rank, world size, local rank, generation) from
torch.distributed or the environment, which is what the owner is greeted with.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import attrs

from supervise.policy import Policy
from supervise.snapshot import protocol as p
from supervise.snapshot.budget import MemoryBudget, total_ram
from supervise.snapshot.client import AGENT_ENV, AgentClient, LocalOwner, Owner
from supervise.snapshot.errors import SnapshotError
from supervise.snapshot.persist import (
    JOB_ENV,
    RESUME_FINISHED_ENV,
    Persister,
    PersistTier,
    check_job,
    check_resumable,
    job_fingerprint,
)
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService

log = logging.getLogger("supervise.torch.snapshotter")

SHM_ENV = "SUPERVISE_SHM_DIR"


def rank_world() -> tuple[int, int]:
    """This process's rank and world size: torch.distributed's once initialised, else the
    environment's (``RANK``, ``WORLD_SIZE``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return env_int("RANK", 0), env_int("WORLD_SIZE", 1)


def env_int(name: str, default: int) -> int:
    """An integer >= 0 from the environment (``default`` when unset or empty)."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SnapshotError(f"{name}={raw!r} in the environment is not an integer") from None
    if value < 0:
        raise SnapshotError(f"{name}={raw!r} in the environment must be >= 0")
    return value


def job_of(world_size: int) -> str:
    """This run's job name: ``SUPERVISE_JOB`` (the node agent sets it for its workers), else a
    fingerprint of this process's command line and the world size."""
    raw = os.environ.get(JOB_ENV, "")
    if not raw:
        return job_fingerprint(sys.argv, world_size)
    try:
        return check_job(raw)
    except ValueError as exc:
        raise SnapshotError(f"{JOB_ENV}={raw!r} in the environment: {exc}") from None


def resume_finished() -> bool:
    """Whether ``SUPERVISE_RESUME_FINISHED`` asks to resume a finished job."""
    raw = os.environ.get(RESUME_FINISHED_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise SnapshotError(f"{RESUME_FINISHED_ENV}={raw!r} in the environment: use 1 or 0")


@attrs.frozen(slots=True)
class Wiring:
    """The owner greeted, the policy that applies, and the persist tier this rank reads.
    ``persister``: standalone only, when the policy persists (it writes to ``tier``)."""

    owner: Owner
    policy: Policy
    standalone: bool
    tier: PersistTier
    persister: Persister | None


def connect(
    hello: p.Hello, policy: Policy | None, shm_dir: str | os.PathLike[str] | None
) -> Wiring:
    """Greet the node agent when the environment names one (its policy applies), else open a
    standalone arena in this process (``policy=None``: persist every snapshot, as nothing else
    outlives the process) with its persister."""
    endpoint = os.environ.get(AGENT_ENV, "")
    job = job_of(hello.world_size)
    persister: Persister | None = None
    owner: Owner
    if endpoint:
        standalone = False
        owner = AgentClient(endpoint, hello.rank)
        greeting = owner.hello(hello)
        agent_policy = Policy.from_dict(greeting.policy) if greeting.policy else Policy()
        if policy is not None and policy != agent_policy:
            log.warning("the node agent's policy applies; the policy given here is ignored")
        policy = agent_policy
        tier = PersistTier(policy.persist.path, rank=hello.rank, keep=policy.persist.keep, job=job)
    else:
        standalone = True
        if policy is None:
            base = Policy()
            policy = attrs.evolve(base, persist=attrs.evolve(base.persist, every_snapshots=1))
        tier = PersistTier(policy.persist.path, rank=hello.rank, keep=policy.persist.keep, job=job)
        check_resumable(
            [tier],
            resume_finished=resume_finished(),
            hint=f"set {RESUME_FINISHED_ENV}=1 to resume it, or {JOB_ENV}=NAME for another job",
        )
        r = policy.retention
        rule = RetentionRule(r.keep_last, r.keep_best, r.best_metric, r.best_mode)
        budget = MemoryBudget(r.memory_budget.resolve(total_ram()))
        directory = Path(shm_dir or os.environ.get(SHM_ENV) or "/dev/shm")
        service = ArenaService(
            directory, rule=rule, budget=budget, node="standalone", anonymous=True
        )
        if policy.persist.every_snapshots:
            own = tier
            persister = Persister(service, lambda _rank: own, every=policy.persist.every_snapshots)
            service.add_commit_hook(persister.on_commit)
        owner = LocalOwner(service, hello.rank)
        owner.hello(hello)
        tier.clean_temporaries()
    return Wiring(owner, policy, standalone, tier, persister)
