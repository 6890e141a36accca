"""`supervise demo --tasks --quick` end to end: three real farm node agents, a node killed
(kill -9 of its agent and every process under it) in the middle of a step; every result equal
to a failure-free run, no finished step run twice, nothing left running. Bad usage: one line,
exit 2."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from test_demo_end_to_end import demo

from supervise.cli import main

FARM_DEMO_LIMIT_S = 240  # about 20 s alone here; generous for a loaded CI machine


@pytest.mark.slow
def test_the_quick_farm_demo_survives_a_node_loss_and_leaves_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    output = tmp_path / "output.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with demo(["--tasks", "--quick", "--out", str(out_dir)], env=env, output=output) as watched:
        try:
            code = watched.proc.wait(FARM_DEMO_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the farm demo ran past {FARM_DEMO_LIMIT_S} s:\n{output.read_text()}")
        watched.stop_watching()
        report = output.read_text()
        assert code == 0, report
        assert watched.book.survivors() == [], report
        assert len(watched.book) >= 7  # the demo, 3 agents, their task workers
    for line in (
        "the node loss struck a task mid-step",
        "every task of the lost node resumed on another node at the step it lost",
        "every task completed on the farm: 4/4 completed",
        "every result equals a failure-free run (in-process, no farm): 4/4 equal",
        "finished steps never re-ran (executions counted by idempotency key)",
        "no orphan process",
    ):
        assert f"PASS  {line}" in report, report
    assert re.search(r"^   takeover: [\d.]+ s from the loss of node \d", report, re.M), report
    assert "RESULT: PASS" in report
    html = (out_dir / "timeline.html").read_text()
    assert "<svg" in html and "lost (kill -9)" in html and "PASS" in html
    assert (out_dir / "results.json").exists() and any((out_dir / "effects").iterdir())


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tasks", "--count", "9"], "--count 9"),
        (["--tasks", "--steps", "600"], "--steps applies to the training demo"),
        (["--count", "5"], "--count applies to --tasks only"),
        (["--tasks", "--step-delay", "0"], "--step-delay 0"),
    ],
)
def test_bad_farm_demo_usage_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code = main(["demo", "--out", str(tmp_path / "d"), *argv])
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert out == "" and not (tmp_path / "d").exists()
