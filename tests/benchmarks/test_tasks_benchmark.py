"""Keeps the farm part of `benchmarks/tasks.py` from rotting: 1,000 tiny tasks and one node
loss through a real 3-node farm, measured by the benchmark's own code and rendered into its
report. Nothing here asserts on speed: only that nothing was lost, duplicated or re-run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import tasks  # noqa: E402


def test_only_the_farm_part_of_the_results_is_replaced() -> None:
    text = f"a\n{tasks.BEGIN}\nold {tasks.FARM_BEGIN}\nx\n{tasks.FARM_END} tail\n{tasks.END}\n"
    report = f"{tasks.FARM_BEGIN}\nnew \\1 figures\n{tasks.FARM_END}"
    out = tasks._replace(text, tasks.FARM_BEGIN, tasks.FARM_END, report)
    assert out == f"a\n{tasks.BEGIN}\nold {report} tail\n{tasks.END}\n"


@pytest.mark.slow
async def test_a_thousand_tiny_tasks_and_a_node_loss_lose_and_duplicate_nothing(
    tmp_path: Path,
) -> None:
    figures = await tasks.farm_bench(tmp_path, tasks=1000)
    assert (figures.tasks, figures.lost, figures.duplicated, figures.reran) == (1000, 0, 0, 0)
    assert figures.lost_node != 0 and figures.resumed_node != str(figures.lost_node)
    assert figures.resumed_step == figures.lost_step  # the lost step, not the task from scratch
    assert figures.takeover > 0 and figures.rate > 0
    report = tasks._farm_report(figures)
    assert report.startswith(tasks.FARM_BEGIN) and "1000 tiny tasks" in report
