"""The import-layers check (tools/check_layers.py): the real house passes, and each broken rule
in a small made-up package is caught, whatever form the import takes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "check_layers.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layers", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module
    spec.loader.exec_module(module)
    return module


layers = _load()


def _house(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package named `supervise` under ``tmp_path`` with the given modules."""
    root = tmp_path / "supervise"
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(root).parents:
            init = root / parent / "__init__.py"
            if not init.exists():
                init.write_text("")
        path.write_text(textwrap.dedent(body))
    return root


def test_the_real_house_passes() -> None:
    r = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "layers and loops OK" in r.stdout


def test_a_clean_made_up_house_passes(tmp_path: Path) -> None:
    root = _house(
        tmp_path,
        {
            "runtime/core.py": "import trio\n",
            "policy/model.py": "from supervise.runtime.core import trio\n",
            "agents/node.py": "from supervise.agents.executor import run\n",
            "agents/executor.py": "from supervise.policy import model\n",
        },
    )
    assert layers.problems(root) == []


@pytest.mark.parametrize(
    "body",
    [
        "from supervise.agents.node import x\n",
        "def f():\n    from supervise.agents import node\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import supervise.agents.node\n",
        "from ..agents import node\n",
    ],
    ids=["module-level", "in-a-function", "type-checking", "relative"],
)
def test_an_upward_import_is_caught_in_any_form(tmp_path: Path, body: str) -> None:
    root = _house(tmp_path, {"agents/node.py": "x = 1\n", "policy/model.py": body})
    found = layers.problems(root)
    assert any("policy/ may not import agents/" in line for line in found), found


def test_a_loop_inside_agents_is_caught(tmp_path: Path) -> None:
    root = _house(
        tmp_path,
        {
            "agents/node.py": "from supervise.agents.executor import Executor\n",
            "agents/executor.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from supervise.agents.node import NodeRuntime\n"
            ),
        },
    )
    found = layers.problems(root)
    assert found == ["import loop: supervise.agents.executor <-> supervise.agents.node"]


def test_a_loop_through_a_package_face_is_caught(tmp_path: Path) -> None:
    root = _house(
        tmp_path,
        {
            "cluster/__init__.py": "from supervise.cluster.keys import CurveKeys\n",
            "cluster/transport.py": "from supervise.cluster import CurveKeys\n",
            "cluster/keys.py": "CurveKeys = 1\n",
        },
    )
    found = layers.problems(root)
    assert any("imports its own package's face supervise.cluster" in x for x in found), found


def test_the_package_face_is_off_limits_to_library_rooms(tmp_path: Path) -> None:
    root = _house(tmp_path, {"telemetry/lifecycle.py": "from supervise import __version__\n"})
    found = layers.problems(root)
    assert any("imports the package face" in line for line in found), found


def test_torch_outside_its_room_is_caught(tmp_path: Path) -> None:
    root = _house(
        tmp_path,
        {"snapshot/arena.py": "def f():\n    import torch\n", "torch/snap.py": "import torch\n"},
    )
    found = layers.problems(root)
    assert len(found) == 1 and "supervise.snapshot.arena imports torch" in found[0], found


def test_a_module_in_no_room_is_named(tmp_path: Path) -> None:
    root = _house(
        tmp_path, {"_cli_node.py": "from supervise.runtime import x\n", "runtime/x.py": ""}
    )
    found = layers.problems(root)
    assert any("supervise._cli_node is in no room" in line for line in found), found


def test_the_command_fails_with_one_line_per_problem(tmp_path: Path) -> None:
    root = _house(tmp_path, {"runtime/a.py": "from supervise.agents import b\n", "agents/b.py": ""})
    r = subprocess.run(
        [sys.executable, str(TOOL), str(root)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "supervise/runtime/a.py:1: runtime/ may not import agents/ "
        "(supervise.runtime.a -> supervise.agents.b)"
    ]
