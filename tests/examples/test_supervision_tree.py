"""The runtime example runs to completion on its own and shows what happened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "supervision_tree.py"


def test_supervision_tree_example_runs_and_shuts_down_on_its_own() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("root/flaky       child_restarted") == 2
    assert "root/ticker      child_exited             reason=abnormal exit_code=3" in out
    assert "stream=stdout line=tick 2" in out
    assert "--- work done so far: " in out
    assert "supervisor_auto_shutdown" in out
    assert out.rstrip().endswith("--- the tree shut down on its own")
