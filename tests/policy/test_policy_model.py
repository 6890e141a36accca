"""The Policy model: defaults of the design, Python construction, exact round trips."""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings

import supervise as sv
from supervise.policy import Size

from .strategies import policies

DESIGN_DEFAULTS = {
    "supervision": {"max_restarts": 3, "max_seconds": 5.0},
    "snapshot": {
        "every_steps": 10,
        "every_seconds": 0.0,
        "on_best": "",
        "milestones": [],
        "staging_budget": "0%",
    },
    "retention": {
        "keep_last": 1,
        "keep_best": 0,
        "best_metric": "loss",
        "best_mode": "min",
        "memory_budget": "50%",
    },
    "replication": {
        "replicas": 2,
        "placement": "group",
        "every_seconds": 0.0,
        "curve": False,
        "curve_keys": "",
    },
    "persist": {"every_snapshots": 0, "path": "supervise-checkpoints", "keep": 2},
    "recovery": {
        "max_attempts": 3,
        "checkpoint": "latest",
        "version": 0,
        "restore_optimizer": True,
        "heartbeat_timeout": 60.0,
        "startup_timeout": 300.0,
        "hang_detection": "adaptive",
        "hang_phi": 8.0,
        "hang_min_steps": 5.0,
        "hang_min_silence": 3.0,
        "on_nan": "rollback",
        "on_no_snapshot": "stop",
        "on_recovery": "",
        "on_failure": "",
        "preload": ["torch", "torch._dynamo", "supervise.torch.snapshotter"],
        "fork_server": True,
        "backoff": {
            "initial": 1.0,
            "max": 60.0,
            "multiplier": 2.0,
            "jitter": 0.1,
            "reset_after": 600.0,
        },
    },
    "cluster": {"heartbeat_interval": 1.0, "peer_timeout": 10.0, "rejoin_timeout": 300.0},
}


def test_defaults_are_the_design_schema_plus_extensions() -> None:
    assert sv.Policy.default().to_dict() == DESIGN_DEFAULTS
    assert sv.Policy.default() == sv.Policy() == sv.Policy.from_dict({})
    assert sv.Policy.from_toml_text("") == sv.Policy.default()


def test_recovery_backoff_defaults_differ_from_the_runtime_ones() -> None:
    assert sv.Recovery().backoff == sv.Backoff(
        initial=1.0, max=60.0, multiplier=2.0, jitter=0.1, reset_after=600.0
    )
    assert sv.Backoff() == sv.Backoff(initial=0.1, max=30.0, multiplier=2.0, jitter=0.0)


def test_a_partial_backoff_table_keeps_the_policy_defaults() -> None:
    policy = sv.Policy.from_dict({"recovery": {"backoff": {"max": "2m"}}})
    assert policy.recovery.backoff == sv.Backoff(
        initial=1.0, max=120.0, multiplier=2.0, jitter=0.1, reset_after=600.0
    )


def test_reset_after_zero_in_a_file_means_never() -> None:
    policy = sv.Policy.from_dict({"recovery": {"backoff": {"reset_after": 0}}})
    assert policy.recovery.backoff.reset_after is None
    assert policy.to_dict()["recovery"]["backoff"]["reset_after"] == 0.0
    assert sv.Policy.from_dict(policy.to_dict()) == policy


def test_design_example_in_python() -> None:
    policy = sv.Policy(
        snapshot=sv.SnapshotSchedule(every_steps=10),
        retention=sv.Retention(keep_last=2, keep_best=1, best_metric="loss", best_mode="min"),
        replication=sv.Replication(replicas=2, placement="group"),
        recovery=sv.Recovery(
            max_attempts=3,
            backoff=sv.Backoff(initial=1.0, max=60.0),
            checkpoint="latest",
            restore_optimizer=True,
        ),
    )
    assert sv.Policy.from_dict(policy.to_dict()) == policy


def test_units_are_parsed_in_python_too() -> None:
    recovery = sv.Recovery(heartbeat_timeout="5m", startup_timeout="1h30m")
    assert recovery.heartbeat_timeout == 300.0 and recovery.startup_timeout == 5400.0
    retention = sv.Retention(memory_budget="64GiB")
    assert retention.memory_budget == Size(nbytes=64 << 30)
    schedule = sv.SnapshotSchedule(milestones=[0.75, 0.25], every_seconds=2)  # type: ignore[arg-type]
    assert schedule.milestones == (0.25, 0.75)
    assert isinstance(schedule.every_seconds, float)


def test_policies_are_frozen_and_hashable() -> None:
    policy = sv.Policy.default()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.snapshot = sv.SnapshotSchedule()  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.snapshot.every_steps = 1  # type: ignore[misc]
    assert hash(policy) == hash(sv.Policy.default())
    assert {policy: 1}[sv.Policy()] == 1
    changed = attrs.evolve(policy, snapshot=sv.SnapshotSchedule(every_steps=1))
    assert changed != policy and changed.snapshot.every_steps == 1


def test_evolve_validates() -> None:
    with pytest.raises(sv.InvalidValue, match="keep_last"):
        attrs.evolve(sv.Retention(), keep_last=0)


def test_to_dict_holds_toml_types_only() -> None:
    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        else:
            assert isinstance(value, str | int | float | bool), value

    walk(sv.Policy(snapshot=sv.SnapshotSchedule(milestones=(0.5,))).to_dict())


def test_to_toml_is_what_tomllib_reads() -> None:
    policy = sv.Policy(
        persist=sv.Persist(path='C:\\runs\\"quoted" and ünïcode ✓'),
        snapshot=sv.SnapshotSchedule(milestones=(0.1, 0.5), staging_budget="1536MiB"),
    )
    text = policy.to_toml(header=("a header",))
    assert text.startswith("# a header\n")
    assert tomllib.loads(text) == policy.to_dict()
    assert sv.Policy.from_toml_text(text) == policy


def test_from_toml_reads_a_path(tmp_path: Path) -> None:
    file = tmp_path / "p.toml"
    file.write_text('[snapshot]\nevery_steps = 5\n[retention]\nmemory_budget = "8GiB"\n')
    assert sv.Policy.from_toml(file).snapshot.every_steps == 5
    assert sv.Policy.from_toml(str(file)).retention.memory_budget == Size(nbytes=8 << 30)


def test_from_toml_file_problems(tmp_path: Path) -> None:
    with pytest.raises(sv.PolicyError) as info:
        sv.Policy.from_toml(tmp_path / "missing.toml")
    assert str(info.value) == f"{tmp_path / 'missing.toml'}: no such file"
    with pytest.raises(sv.PolicyError, match="is a directory"):
        sv.Policy.from_toml(tmp_path)
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(sv.PolicyError, match="too large"):
        sv.Policy.from_toml(big)
    with pytest.raises(sv.PolicyError, match="cannot read: embedded null byte"):
        sv.Policy.from_toml("a\0b.toml")
    empty = tmp_path / "empty.toml"
    empty.write_bytes(b"")
    assert sv.Policy.from_toml(empty) == sv.Policy.default()


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=100)
@given(policies())
def test_dict_round_trip_is_exact(policy: sv.Policy) -> None:
    assert sv.Policy.from_dict(policy.to_dict()) == policy


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=100)
@given(policies())
def test_toml_round_trip_is_exact(policy: sv.Policy) -> None:
    text = policy.to_toml()
    assert sv.Policy.from_toml_text(text) == policy
    assert sv.Policy.from_toml_text(text).to_toml() == text
