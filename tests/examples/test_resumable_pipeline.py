"""examples/resumable_pipeline.py: the worker is killed (SIGKILL) in the middle of the train
step; the task resumes in a new worker, the finished stages never run again (their side
effects are counted), and the result equals the failure-free run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "resumable_pipeline.py"


def test_the_pipeline_resumes_after_kill_9_and_runs_each_finished_stage_once() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, check=False
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "--- kill -9 of worker pid" in out
    assert "running -> pending   node_lost worker exited without an outcome" in out
    assert "(abnormal: signal SIGKILL)" in out
    for stage, started in [("ingest", 1), ("clean", 1), ("features", 1), ("train", 2)]:
        assert f"    {stage:<9} {started} / 1\n" in out
    assert "    evaluate  1 / 1\n" in out
    assert "--- attempts: 2" in out
    assert "--- result equals the failure-free run: yes" in out
    assert "--- every finished stage ran once: yes" in out
