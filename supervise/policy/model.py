"""`Policy`: the whole declarative policy, from Python, a dict or a TOML file, and back."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from supervise._validation import InvalidValue, instance_of
from supervise.policy import _load, _toml
from supervise.policy._rules import Rule, enforce
from supervise.policy.errors import PolicyError, Problem
from supervise.policy.sections import (
    Cluster,
    Persist,
    Recovery,
    Replication,
    Retention,
    SnapshotSchedule,
    Supervision,
)
from supervise.policy.units import Size
from supervise.runtime.backoff import Backoff

__all__ = ["Policy"]


def _on_best_rule(p: Policy) -> InvalidValue | None:
    if p.snapshot.on_best and p.snapshot.on_best != p.retention.best_metric:
        return InvalidValue(
            "snapshot.on_best",
            p.snapshot.on_best,
            f'must be "" or the metric retention ranks by '
            f"(retention.best_metric = {p.retention.best_metric!r}), which also sets the direction",
        )
    return None


def _best_checkpoint_rule(p: Policy) -> InvalidValue | None:
    if p.recovery.checkpoint == "best" and p.retention.keep_best == 0:
        return InvalidValue(
            "recovery.checkpoint",
            "best",
            "needs retention.keep_best >= 1 (no best snapshot is kept)",
        )
    return None


def _plain(obj: Any) -> Any:
    """A policy value as TOML-ready plain data (sizes as text, tuples as lists)."""
    if isinstance(obj, Backoff):
        return {
            "initial": float(obj.initial),
            "max": float(obj.max),
            "multiplier": float(obj.multiplier),
            "jitter": float(obj.jitter),
            "reset_after": 0.0 if obj.reset_after is None else float(obj.reset_after),
        }
    if isinstance(obj, Size):
        return str(obj)
    if attrs.has(type(obj)):
        return {f.name: _plain(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


@attrs.frozen(slots=True)
class Policy:
    """Everything supervise does on a node and in training, declared in one frozen tree.

    Build it in Python (``Policy(snapshot=SnapshotSchedule(every_steps=10))``), from a dict
    (`from_dict`) or a TOML file (`from_toml`); every part of the system reads its own section.
    """

    supervision: Supervision = attrs.field(
        factory=Supervision, validator=instance_of(Supervision), metadata={"table": Supervision}
    )
    snapshot: SnapshotSchedule = attrs.field(
        factory=SnapshotSchedule,
        validator=instance_of(SnapshotSchedule),
        metadata={"table": SnapshotSchedule},
    )
    retention: Retention = attrs.field(
        factory=Retention, validator=instance_of(Retention), metadata={"table": Retention}
    )
    replication: Replication = attrs.field(
        factory=Replication, validator=instance_of(Replication), metadata={"table": Replication}
    )
    persist: Persist = attrs.field(
        factory=Persist, validator=instance_of(Persist), metadata={"table": Persist}
    )
    recovery: Recovery = attrs.field(
        factory=Recovery, validator=instance_of(Recovery), metadata={"table": Recovery}
    )
    cluster: Cluster = attrs.field(
        factory=Cluster, validator=instance_of(Cluster), metadata={"table": Cluster}
    )

    _RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(("snapshot.on_best", "retention.best_metric"), _on_best_rule),
        Rule(("recovery.checkpoint", "retention.keep_best"), _best_checkpoint_rule),
    )

    def __attrs_post_init__(self) -> None:
        enforce(self._RULES, self)

    @classmethod
    def default(cls) -> Policy:
        """The policy with every default (the same as ``policies/default.toml``)."""
        return cls()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Policy:
        """Build from plain data shaped like the TOML file; `PolicyError` lists every problem.

        ``source`` names where the data came from in error messages (a file name).
        """
        given: object = data  # callers outside mypy pass anything
        if not isinstance(given, Mapping):
            problem = Problem(
                "", f"a policy must be a mapping of sections, not {type(given).__name__}"
            )
            raise PolicyError([attrs.evolve(problem, file=source)])
        problems: list[Problem] = []
        policy = _load.build(cls, data, cls(), path="", root=cls, problems=problems, source=source)
        if policy is None:
            raise PolicyError(problems)
        return policy

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a TOML policy file; `PolicyError` names the file, each bad key and its value."""
        data, source = _load.read_toml(path)
        return cls.from_dict(data, source=source)

    @classmethod
    def from_toml_text(cls, text: str | bytes, *, source: str = "<string>") -> Policy:
        """Read a policy from TOML text (``source`` names it in error messages)."""
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
        return cls.from_dict(_load.parse_toml(raw, source), source=source)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML types only) that `from_dict` turns back into an equal policy."""
        result: dict[str, Any] = _plain(self)
        return result

    def to_toml(self, *, header: tuple[str, ...] = ()) -> str:
        """The policy as a TOML document with every key spelled out."""
        return _toml.dumps(self.to_dict(), header=header)
