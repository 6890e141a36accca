"""The farm demo's timeline, checks, report and picture, from recorded data (no farm)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from supervise._demo.farm.checks import farm_checks
from supervise._demo.farm.config import FarmDemoConfig
from supervise._demo.farm.picture import write_html
from supervise._demo.farm.pipeline import STAGES, TARGET, mark_path, same
from supervise._demo.farm.records import (
    NodeLoss,
    StepRun,
    TaskView,
    executions,
    read_runs,
    reruns,
    state_changes,
)
from supervise._demo.farm.report import render
from supervise._demo.farm.result import FarmResult
from supervise._demo.farm.scenario import settle
from supervise._validation import InvalidValue
from supervise.tasks import InProcess, MemoryJournal, TaskRunner, TaskSpec, unwrap

T0 = 1_000.0
PACE = 0.5


def _steps(task: str, node: str, attempt: int, pid: int, at: float, stages: tuple[str, ...],
           *, cut: str | None = None) -> list[StepRun]:  # fmt: skip
    out = []
    for step in stages:
        done = None if step == cut else at + PACE
        out.append(StepRun(task, step, attempt, node, pid, at, done))
        at += PACE
    return out


def recorded(*, resumed: bool = True, rerun: bool = False) -> FarmResult:
    """A recorded run: four pipelines on nodes 0-2; node 1 killed at T0+3.2 in the middle of
    pipeline-2's 'train'; it resumes on node 2 at T0+5.8 from its journal."""
    config = FarmDemoConfig(out_dir="/tmp/unused", tasks=4)
    result = FarmResult(config, Path("policy.toml"), 2.0, Path("/tmp/unused"), T0)
    runs = _steps("pipeline-1", "0", 1, 101, T0 + 1.0, STAGES)
    runs += _steps("pipeline-2", "1", 1, 201, T0 + 1.7, STAGES[:4], cut="train")
    if resumed:
        runs += _steps("pipeline-2", "2", 2, 301, T0 + 5.8, STAGES[3:])
    if rerun:
        runs += _steps("pipeline-2", "2", 2, 301, T0 + 7.0, ("clean",))
    runs += _steps("pipeline-3", "2", 1, 302, T0 + 1.1, STAGES)
    runs += _steps("pipeline-4", "0", 1, 102, T0 + 1.2, STAGES)
    result.loss = NodeLoss(1, T0 + 3.2, 4000, (4001, 4002), ())
    result.farm_started_at, result.farm_finished_at = T0 + 0.9, T0 + 7.0
    for i, task in enumerate(config.task_ids, 1):
        view = TaskView(task, i, state="completed", attempts=2 if i == 2 else 1, equal=True)
        view.states = state_changes(
            [{"target": "pending", "reason": "submitted", "wall_time": T0 + 0.9},
             {"target": "running", "reason": "started", "wall_time": T0 + 1.0}]
        )  # fmt: skip
        result.tasks.append(view)
    settle(result, sorted(runs, key=lambda r: r.started))
    result.processes_seen = 9
    result.checks = farm_checks(result)
    return result


def test_a_recorded_run_passes_every_check_and_times_the_takeover() -> None:
    result = recorded()
    assert result.loss is not None and result.loss.tasks == ("pipeline-2",)
    (t,) = result.takeovers
    assert (t.task, t.lost_step, t.node, t.step) == ("pipeline-2", "train", "2", "train")
    assert t.seconds == pytest.approx(2.6) and t.replayed == ("ingest", "clean", "features")
    assert [c.ok for c in result.checks] == [True] * 6, result.checks
    assert result.ok
    counts = executions(result.runs)
    assert counts["pipeline-2/train"] == (2, 1) and counts["pipeline-1/train"] == (1, 1)


def test_the_report_shows_attempts_nodes_states_and_the_takeover() -> None:
    text = render(recorded())
    assert "node 1 lost at 3.20 s: kill -9 of agent pid 4000 and 2 processes" in text
    assert "task pipeline-2 (seed 2): completed, 2 worker attempts, node 1 -> node 2" in text
    assert "attempt 1 on node 1, worker pid 201:" in text and "train 3.20-lost" in text
    assert "(from the journal: ingest, clean, features)" in text
    assert re.search(r"takeover: 2\.60 s from the loss of node 1 to 'train' running on node 2"
                     r" \(within the target peer_timeout \+ 1 s = 3 s\)", text)  # fmt: skip
    assert "states: 0.90 pending (submitted)  1.00 running (started)" in text
    assert text.rstrip().endswith("RESULT: PASS")


def test_a_step_run_again_after_it_finished_fails_the_check() -> None:
    result = recorded(rerun=True)
    assert reruns(result.runs) == ["pipeline-2/clean"]
    once = next(c for c in result.checks if c.name.startswith("finished steps never re-ran"))
    assert not once.ok and "RAN AGAIN after finishing: pipeline-2/clean" in once.detail
    assert not result.ok


def test_a_task_never_resumed_fails_the_takeover_and_step_checks() -> None:
    result = recorded(resumed=False)
    takeover = result.checks[1]
    assert not takeover.ok and "pipeline-2: never resumed" in takeover.detail
    assert "never finished: pipeline-2/train" in result.checks[4].detail
    assert "RESULT: FAIL" in render(result)


def test_the_picture_draws_every_step_the_cut_and_the_kill(tmp_path: Path) -> None:
    result = recorded()
    page = write_html(result, tmp_path / "timeline.html").read_text()
    assert page.count("<rect") >= len(result.runs) and "cut by the node loss" in page
    assert "node 1 lost (kill -9)" in page and "takeover of pipeline-2: 2.60 s" in page
    assert "<script" not in page and "PASS" in page


async def test_the_pipeline_is_deterministic_and_records_each_execution(tmp_path: Path) -> None:
    values = []
    for task in ("a", "b"):
        spec = TaskSpec(TARGET, [str(tmp_path), 7, 0.0], task_id=task)
        values.append(unwrap(await TaskRunner(spec, InProcess(spec, MemoryJournal())).run()))
    assert same(values[0], values[1]) and isinstance(values[0]["w"], np.ndarray)
    assert not same(values[0], {**values[0], "w": values[0]["w"] + 1e-12})
    runs = read_runs(tmp_path)
    assert {r.key for r in runs} == {f"{t}/{s}" for t in "ab" for s in STAGES}
    assert all(r.done is not None and r.node == "local" for r in runs)
    path = mark_path(tmp_path, "a/train", 1, runs[0].pid, "start")
    assert json.loads(path.read_text())["key"] == "a/train"


def test_config_refuses_more_tasks_than_the_survivors_hold() -> None:
    with pytest.raises(InvalidValue, match=r"must be 4\.\.6"):
        FarmDemoConfig(out_dir="x", tasks=7, nodes=3)
    with pytest.raises(InvalidValue, match=r"must be 4\.\.6"):
        FarmDemoConfig(out_dir="x", tasks=3, nodes=3)


def test_the_victim_is_a_step_early_in_its_run_off_the_coordinator() -> None:
    import time

    from supervise._demo.farm.scenario import _victim

    now = time.time()
    coordinator = StepRun("a", "train", 1, "0", 1, now - 0.05, None)
    too_early = StepRun("b", "clean", 1, "1", 2, now - 0.05, None)
    too_late = StepRun("c", "features", 1, "2", 3, now - 0.4, None)
    fits = StepRun("d", "features", 1, "1", 4, now - 0.05, None)
    finished = StepRun("e", "train", 1, "2", 5, now - 0.05, now)
    assert _victim([coordinator, too_early, too_late, finished], 0.5, relaxed=False) is None
    assert _victim([coordinator, too_early, too_late, fits], 0.5, relaxed=False) == fits
    assert _victim([coordinator, too_early], 0.5, relaxed=True) == too_early
