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
