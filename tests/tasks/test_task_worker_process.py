"""Attempts in real worker processes with the journal on disk: an attempt that raised after a
committed step is retried in a new process, which gets the step back instead of running it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from supervise._testing.poll import wait_until_async
from supervise.runtime import Backoff
from supervise.tasks import (
    Manual,
    Reason,
    RetryPolicy,
    TaskPolicy,
    TaskRunner,
    TaskSpec,
    TaskState,
    WorkerProcess,
    run_local,
    unwrap,
)

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


async def test_a_retried_attempt_in_a_new_process_resumes_from_the_disk_journal(
    tmp_path: Path,
) -> None:
    log = tmp_path / "effects.log"
    fast = RetryPolicy(backoff=Backoff(initial=0.01, max=0.01))
    spec = TaskSpec(
        "taskfuncs:fails_once", (str(log),), task_id="t1", policy=TaskPolicy(retry=fast)
    )
    result = await run_local(spec, tmp_path / "task", journal="disk", env={"PYTHONPATH": str(HERE)})
    assert unwrap(result) == ["first", 2, "t1/first"]
    assert log.read_text() == "first\n"  # the step ran once, in the first process
    assert [t.reason for t in result.history if t.target is TaskState.PENDING][1:] == [
        Reason.APP_ERROR
    ]
    assert sorted(p.name for p in (tmp_path / "task" / "journal").iterdir()) == [
        "commit-00000001.rec",  # the step; nothing else changed, so nothing else is written
        "outcome.rec",
    ]


async def test_pause_commits_what_the_worker_finished_even_with_manual_checkpoints(
    tmp_path: Path,
) -> None:
    log = tmp_path / "effects.log"
    spec = TaskSpec(
        "taskfuncs:slow_steps", [str(log), 4], task_id="t2", policy=TaskPolicy(checkpoint=Manual())
    )
    launcher = WorkerProcess(spec, tmp_path / "task", env={"PYTHONPATH": str(HERE)})
    runner = TaskRunner(spec, launcher)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await wait_until_async(
            lambda: log.exists() and "s1" in log.read_text(), what="step s1 runs", timeout_s=60
        )
        runner.pause()  # the worker is in step s1: it finishes it, commits s0 and s1, stops
        await wait_until_async(
            lambda: runner.state is TaskState.PAUSED, what="the task is paused", timeout_s=60
        )
        runner.resume()
    assert runner.state is TaskState.COMPLETED
    assert log.read_text().split() == ["s0", "s1", "s2", "s3"]  # nothing ran twice
