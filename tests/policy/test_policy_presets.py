"""The presets in policies/ load, say what they promise, and docs/policy.md documents every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import supervise as sv
from supervise.policy import _toml
from supervise.policy._load import key_paths

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "policies").glob("*.toml"))


def leaves(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= leaves(value, path + ".")
        else:
            out[path] = value
    return out


def test_the_required_presets_exist() -> None:
    names = {p.name for p in PRESETS}
    assert {"default.toml", "gemini.toml", "conservative.toml", "single-node.toml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_is_valid_and_commented(path: Path) -> None:
    policy = sv.Policy.from_toml(path)
    assert sv.Policy.from_dict(policy.to_dict()) == policy
    text = path.read_text()
    header = text.split("\n\n")[0]
    assert "What it is for" in header and "Trade-offs" in header


def test_default_preset_is_the_default_policy_with_every_key() -> None:
    path = ROOT / "policies" / "default.toml"
    assert sv.Policy.from_toml(path) == sv.Policy.default()
    text = path.read_text()
    for key in leaves(sv.Policy.default().to_dict()):
        name = key.rpartition(".")[2]
        assert re.search(rf"^{name} = ", text, re.MULTILINE), key


def test_gemini_preset() -> None:
    policy = sv.Policy.from_toml(ROOT / "policies" / "gemini.toml")
    assert policy.snapshot.every_steps == 1
    assert policy.replication.replicas == 2 and policy.replication.placement == "group"
    assert policy.retention.keep_last == 1


def test_conservative_preset() -> None:
    policy = sv.Policy.from_toml(ROOT / "policies" / "conservative.toml")
    assert policy.snapshot.every_steps == 100
    assert policy.persist.every_snapshots == 10
    assert policy.retention.keep_best >= 1
    assert (policy.retention.best_metric, policy.retention.best_mode) == ("loss", "min")


def test_single_node_preset() -> None:
    policy = sv.Policy.from_toml(ROOT / "policies" / "single-node.toml")
    assert policy.replication.replicas == 1
    assert policy.persist.every_snapshots > 0


def test_docs_document_every_key_with_its_default() -> None:
    page = (ROOT / "docs" / "policy.md").read_text()
    rows = {
        m[1]: m[2]
        for m in re.finditer(
            # a policy key is section.key; other tables with a code first column are not keys
            r"^\| `([a-z_]+\.[a-z_.]+)` \| [^|]*(?:\\\|[^|]*)* \| `([^`]*)` \|",
            page,
            re.M,
        )
    }
    defaults = leaves(sv.Policy.default().to_dict())
    assert set(rows) == set(defaults)
    for key, default in defaults.items():
        assert rows[key] == _toml.value(default), key
    assert set(defaults) == {p for p in key_paths(sv.Policy) if p in defaults}
