"""The demo's configuration and its policy preset."""

from __future__ import annotations

from pathlib import Path

import pytest

import supervise as sv
from supervise._demo.config import ALL_FAULTS, DemoConfig, FaultKind
from supervise._demo.scenario import packaged_policy
from supervise._validation import InvalidValue

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_inject_every_fault_in_order(tmp_path: Path) -> None:
    config = DemoConfig(out_dir=tmp_path)
    assert config.faults == ALL_FAULTS
    assert [f.value for f in config.faults] == ["crash", "hang", "node_loss", "nan"]
    assert config.nodes == 3


def test_faults_parse_from_a_comma_list(tmp_path: Path) -> None:
    config = DemoConfig(out_dir=tmp_path, faults="nan, crash")
    assert config.faults == (FaultKind.NAN, FaultKind.CRASH)
    assert DemoConfig(out_dir=tmp_path, faults="").faults == ()


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"nodes": 1}, "nodes", ">= 2"),
        ({"nodes": 9}, "nodes", "<= 8"),
        ({"faults": "crash,meteor"}, "faults", "one of crash, hang, node_loss, nan"),
        ({"steps": 100}, "steps", ">= 300 for 4 fault(s)"),
        ({"step_delay": -1.0}, "step_delay", ">= 0"),
    ],
)
def test_bad_values_name_the_field(
    tmp_path: Path, kwargs: dict[str, object], field: str, allowed: str
) -> None:
    with pytest.raises(InvalidValue) as info:
        DemoConfig(out_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert allowed in info.value.allowed


def test_faults_land_between_snapshots_and_leave_room_to_finish(tmp_path: Path) -> None:
    config = DemoConfig(out_dir=tmp_path, steps=600)
    steps = [config.threshold(i, 5) for i in range(len(config.faults))]
    assert steps == sorted(steps)
    assert all(s % 5 == 2 for s in steps)  # halfway between two snapshots: work is redone
    assert steps[-1] < config.steps - 100
    quick = DemoConfig.quick(tmp_path)
    assert quick.faults == ALL_FAULTS and quick.nodes == 2


def test_the_packaged_policy_is_the_preset_in_policies() -> None:
    preset = ROOT / "policies" / "demo.toml"
    assert packaged_policy().read_bytes() == preset.read_bytes()
    policy = sv.Policy.from_toml(preset)
    assert policy.recovery.heartbeat_timeout <= 10.0
    assert policy.cluster.peer_timeout <= 2.0
    assert policy.replication.replicas == 2
    assert policy.retention.keep_last >= 2  # a NaN rollback needs an older version
