"""The sections of a policy, one frozen class per TOML table, validated at construction.

Field names are the TOML keys; docs/policy.md ("Every key") documents each one.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs

from supervise._validation import InvalidValue, number
from supervise.policy._fields import (
    boolean,
    choice,
    fractions,
    import_path,
    integer,
    metric_name,
    module_names,
    path_text,
    policy_backoff,
    seconds,
    size,
    to_fractions,
    to_names,
    to_seconds,
    to_size,
)
from supervise.policy._rules import Rule, enforce
from supervise.policy.units import Size
from supervise.runtime.backoff import Backoff

__all__ = [
    "DEFAULT_BACKOFF",
    "Cluster",
    "Persist",
    "Recovery",
    "Replication",
    "Retention",
    "SnapshotSchedule",
    "Supervision",
]


@attrs.frozen(slots=True)
class Supervision:
    """The node's own supervision tree: give up after ``max_restarts`` in ``max_seconds``."""

    max_restarts: int = attrs.field(default=3, validator=integer(ge=0))
    max_seconds: float = attrs.field(default=5.0, converter=to_seconds, validator=seconds(gt=0))


@attrs.frozen(slots=True)
class SnapshotSchedule:
    """When to capture: every N steps, every T seconds, at progress milestones, on a new best.

    Every trigger is optional (0, "" or [] turns it off); they combine with "or".
    """

    every_steps: int = attrs.field(default=10, validator=integer(ge=0))
    every_seconds: float = attrs.field(default=0.0, converter=to_seconds, validator=seconds(ge=0))
    on_best: str = attrs.field(default="", validator=metric_name(optional=True))
    milestones: tuple[float, ...] = attrs.field(
        default=(), converter=to_fractions, validator=fractions
    )
    staging_budget: Size = attrs.field(
        default=Size(percent=0.0), converter=to_size, validator=size(nonzero=False)
    )


@attrs.frozen(slots=True)
class Retention:
    """Which snapshots to keep in RAM: the last few, the best few, within a memory budget."""

    keep_last: int = attrs.field(default=1, validator=integer(ge=1))
    keep_best: int = attrs.field(default=0, validator=integer(ge=0))
    best_metric: str = attrs.field(default="loss", validator=metric_name(optional=False))
    best_mode: Literal["min", "max"] = attrs.field(default="min", validator=choice("min", "max"))
    memory_budget: Size = attrs.field(
        default=Size(percent=50.0), converter=to_size, validator=size(nonzero=True)
    )


def _curve_keys_rule(r: Replication) -> InvalidValue | None:
    if r.curve and not r.curve_keys:
        return InvalidValue(
            "curve_keys", r.curve_keys, "required when curve = true: a directory with CURVE keys"
        )
    if r.curve_keys and not r.curve:
        return InvalidValue(
            "curve_keys", r.curve_keys, "is only used with curve = true; set curve or remove it"
        )
    return None


@attrs.frozen(slots=True)
class Replication:
    """Where copies of each snapshot live: groups (Gemini) or a ring of ``replicas`` nodes.

    ``every_seconds``: at most one push per rank and peer in that many seconds, the cluster's
    recoverable point moving at that pace (0: every snapshot as it commits). Replication is
    most of a snapshot's cost on the failure-free path; a node loss then goes back to a
    version up to about twice that old (crashes, hangs and NaNs restore the newest local one).
    ``curve`` authenticates and encrypts peer links with zmq CURVE, using the key files in the
    ``curve_keys`` directory (required with ``curve``; checked on the nodes, not here).
    """

    replicas: int = attrs.field(default=2, validator=integer(ge=1))
    placement: Literal["group", "ring"] = attrs.field(
        default="group", validator=choice("group", "ring")
    )
    every_seconds: float = attrs.field(default=0.0, converter=to_seconds, validator=seconds(ge=0))
    curve: bool = attrs.field(default=False, validator=boolean)
    curve_keys: str = attrs.field(default="", validator=path_text(optional=True))

    _RULES: ClassVar[tuple[Rule, ...]] = (Rule(("curve", "curve_keys"), _curve_keys_rule),)

    def __attrs_post_init__(self) -> None:
        enforce(self._RULES, self)


@attrs.frozen(slots=True)
class Persist:
    """The disk tier: write every N-th snapshot to ``path``, keep the newest ``keep`` there."""

    every_snapshots: int = attrs.field(default=0, validator=integer(ge=0))
    path: str = attrs.field(default="supervise-checkpoints", validator=path_text(optional=False))
    keep: int = attrs.field(default=2, validator=integer(ge=1))


DEFAULT_BACKOFF = Backoff(initial=1.0, max=60.0, multiplier=2.0, jitter=0.1, reset_after=600.0)
"""The policy's recovery backoff (the runtime's own `Backoff()` defaults are for supervisors)."""


def _version_rule(r: Recovery) -> InvalidValue | None:
    if r.checkpoint == "specific" and r.version == 0:
        return InvalidValue(
            "version",
            r.version,
            "checkpoint = 'specific' needs the version (step) to restore, >= 1",
        )
    if r.checkpoint != "specific" and r.version != 0:
        return InvalidValue(
            "version",
            r.version,
            f"is only used with checkpoint = 'specific' (checkpoint is {r.checkpoint!r})",
        )
    return None


@attrs.frozen(slots=True)
class Recovery:
    """How a failure is handled: which snapshot to restore, how often to retry, with what backoff.

    ``max_attempts`` consecutive recoveries are allowed; the count resets once training ran
    ``backoff.reset_after`` seconds without a failure. ``on_no_snapshot``: what a recovery
    does when training had made progress but no version is complete for every rank any more
    ("stop": fail loudly, exit 3; "restart": start over from step 0). ``preload``: modules
    that spare worker processes import ahead of a restart (Python commands only; [] = start
    workers cold); the default covers what every supervised training script imports: torch,
    ``torch._dynamo`` (every ``torch.optim`` optimizer imports it when built: 1.2 s here) and
    the Snapshotter. ``fork_server``: spares are forked from a template process that imported
    ``preload`` once (false: each spare imports it itself, in the idle scheduling class).
    ``hang_detection``: "adaptive" also flags a hang from each rank's own
    step-interval history (``hang_phi``, at least ``hang_min_steps`` typical steps and
    ``hang_min_silence`` seconds), well before ``heartbeat_timeout``, which stays the bound and
    the only rule before that history exists and inside ``Snapshotter.pause()``; "timeout":
    ``heartbeat_timeout`` alone.
    """

    max_attempts: int = attrs.field(default=3, validator=integer(ge=0))
    checkpoint: Literal["latest", "best", "specific"] = attrs.field(
        default="latest", validator=choice("latest", "best", "specific")
    )
    version: int = attrs.field(default=0, validator=integer(ge=0))
    restore_optimizer: bool = attrs.field(default=True, validator=boolean)
    heartbeat_timeout: float = attrs.field(
        default=60.0, converter=to_seconds, validator=seconds(gt=0)
    )
    startup_timeout: float = attrs.field(
        default=300.0, converter=to_seconds, validator=seconds(gt=0)
    )
    hang_detection: Literal["adaptive", "timeout"] = attrs.field(
        default="adaptive", validator=choice("adaptive", "timeout")
    )
    hang_phi: float = attrs.field(default=8.0, validator=number(gt=0, le=100))
    hang_min_steps: float = attrs.field(default=5.0, validator=number(ge=1, le=1000))
    hang_min_silence: float = attrs.field(
        default=3.0, converter=to_seconds, validator=seconds(gt=0)
    )
    on_nan: Literal["rollback", "ignore", "stop"] = attrs.field(
        default="rollback", validator=choice("rollback", "ignore", "stop")
    )
    on_no_snapshot: Literal["stop", "restart"] = attrs.field(
        default="stop", validator=choice("stop", "restart")
    )
    on_recovery: str = attrs.field(default="", validator=import_path)
    on_failure: str = attrs.field(default="", validator=import_path)
    preload: tuple[str, ...] = attrs.field(
        default=("torch", "torch._dynamo", "supervise.torch.snapshotter"),
        converter=to_names,
        validator=module_names,
    )
    fork_server: bool = attrs.field(default=True, validator=boolean)
    backoff: Backoff = attrs.field(
        default=DEFAULT_BACKOFF, validator=policy_backoff, metadata={"table": Backoff}
    )

    _RULES: ClassVar[tuple[Rule, ...]] = (Rule(("checkpoint", "version"), _version_rule),)

    def __attrs_post_init__(self) -> None:
        enforce(self._RULES, self)


def _peer_timeout_rule(c: Cluster) -> InvalidValue | None:
    if c.peer_timeout <= c.heartbeat_interval:
        return InvalidValue(
            "peer_timeout",
            c.peer_timeout,
            f"must be longer than heartbeat_interval ({c.heartbeat_interval:g} s)",
        )
    return None


@attrs.frozen(slots=True)
class Cluster:
    """The failure detector between node agents: heartbeat period, when a peer is lost, and
    how long a recovery waits for a lost node's replacement."""

    heartbeat_interval: float = attrs.field(
        default=1.0, converter=to_seconds, validator=seconds(gt=0)
    )
    peer_timeout: float = attrs.field(default=10.0, converter=to_seconds, validator=seconds(gt=0))
    rejoin_timeout: float = attrs.field(
        default=300.0, converter=to_seconds, validator=seconds(gt=0)
    )

    _RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("heartbeat_interval", "peer_timeout"), _peer_timeout_rule),
    )

    def __attrs_post_init__(self) -> None:
        enforce(self._RULES, self)
