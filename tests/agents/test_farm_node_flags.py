"""``supervise node --tasks`` flags: one-line errors for what does not fit, and the capacity a
farm node offers (detected, overridable)."""

from __future__ import annotations

import argparse

import pytest

from supervise.cli import main
from supervise.cli.node import _farm_options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpus", "2", "--", "true"], "--cpus 2.0: is for farm nodes: add --tasks"),
        (["--label", "a=b", "--", "true"], "--label 'a=b': is for farm nodes: add --tasks"),
        (["--tasks", "--memory", "12Q"], "--memory '12Q': "),  # the wording: resources.py
        (["--tasks", "--cpus", "0"], "--cpus 0.0: must be a number of cores > 0"),
        (["--tasks", "--label", "nolabel"], "nolabel"),
        (["--tasks", "--", "python", "x.py"], "a farm node (--tasks) runs no command"),
        (["--task-workers", "2", "--", "true"], "--task-workers 2: is for farm nodes"),
        (["--tasks", "--task-workers", "-1"], "--task-workers -1: must be an integer >= 0"),
        (["--tasks", "--task-max-tasks", "-5"], "--task-max-tasks -5: must be an integer >= 0"),
        (["--tasks", "--task-preload", "a b"], "--task-preload 'a b': must be module names"),
    ],
)
def test_bad_farm_flags_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["node", "--rank", "0", "--nodes", "127.0.0.1:29999", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_capacity_is_detected_and_overridable() -> None:
    args = argparse.Namespace(tasks=True, cpus=None, memory=None, gpus=None, label=[])
    detected = _farm_options(args)
    assert detected.capacity.cpu >= 1 and detected.capacity.memory > 0
    args = argparse.Namespace(tasks=True, cpus=1.5, memory="512M", gpus=2, label=["zone=a"])
    given = _farm_options(args)
    assert (given.capacity.cpu, given.capacity.memory, given.capacity.gpus) == (1.5, 512e6, 2)
    assert given.labels == {"zone=a"}


def test_warm_task_workers_default_to_one_per_core_and_are_overridable() -> None:
    args = argparse.Namespace(tasks=True, cpus=3.5, memory=None, gpus=None, label=[])
    pool = _farm_options(args).pool
    assert pool.workers is None and pool.for_cores(3.5).workers == 4 and pool.enabled
    args = argparse.Namespace(
        tasks=True,
        cpus=None,
        memory=None,
        gpus=None,
        label=[],
        task_workers=0,
        task_max_tasks=7,
        task_preload="numpy, stages",
    )
    pool = _farm_options(args).pool
    assert (pool.workers, pool.max_tasks, pool.preload) == (0, 7, ("numpy", "stages"))
    assert not pool.for_cores(8).enabled  # 0: a fresh process per attempt, as before
