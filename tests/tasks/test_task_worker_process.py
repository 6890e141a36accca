"""Attempts in real worker processes, journal on disk: a pause stops the worker after it
committed what it finished (even with manual checkpoints), an error in a worker is retried in
a new process, and no finished step ever runs twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
)

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


async def test_pause_then_an_error_resume_from_the_journal_and_run_no_step_twice(
    tmp_path: Path,
) -> None:
    log = tmp_path / "effects.log"
    policy = TaskPolicy(
        checkpoint=Manual(), retry=RetryPolicy(backoff=Backoff(initial=0.01, max=0.01))
    )
    spec = TaskSpec("taskfuncs:slow_steps", [str(log), 4, 2], task_id="t2", policy=policy)
    launcher = WorkerProcess(spec, tmp_path / "task", env={"PYTHONPATH": str(HERE)})
    runner = TaskRunner(spec, launcher)
    result = []

    async def run() -> None:
        result.append(await runner.run())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await wait_until_async(
            lambda: log.exists() and "s1" in log.read_text(), what="step s1 runs", timeout_s=60
        )
        runner.pause()  # the worker is in step s1: it finishes it, commits s0 and s1, stops
        await wait_until_async(
            lambda: runner.state is TaskState.PAUSED, what="the task is paused", timeout_s=60
        )
        runner.resume()
    # attempt 2 got s0 and s1 back, ran s2, raised (s2 committed on the way out); attempt 3 ran s3
    assert (result[0].state, result[0].value, result[0].attempts) == (
        TaskState.COMPLETED,
        ["s0", "s1", "s2", "s3"],
        3,
    )
    assert log.read_text().split() == ["s0", "s1", "s2", "s3"]  # nothing ran twice
    assert [t.reason for t in result[0].history if t.target is TaskState.PENDING] == [
        Reason.SUBMITTED,
        Reason.RESUME_REQUESTED,
        Reason.APP_ERROR,
    ]
    assert "builtins.RuntimeError: attempt 2 fails" in result[0].history[-4].detail


def test_a_worker_started_wrongly_says_why_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from supervise.snapshot import AGENT_ENV
    from supervise.tasks._worker import main

    TaskSpec("taskfuncs:two_steps", task_id="t").save(tmp_path / "spec.rec")
    assert main([str(tmp_path), "0", "n"]) == 2  # attempts count from 1
    monkeypatch.setenv(AGENT_ENV, f"ipc://{tmp_path}/nobody.sock")
    monkeypatch.delenv("SUPERVISE_TASK_SHARD", raising=False)
    assert main([str(tmp_path), "1", "n"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: python -m supervise.tasks._worker")
    assert (
        err[1] == "supervise task worker: SUPERVISE_TASK_SHARD='': must be the task's shard (>= 0)"
    )


async def test_a_disk_journal_is_used_even_under_a_node_agents_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_local from a process that has a snapshot endpoint in its environment (a training
    worker, a task worker): the task's worker must not take it for its journal's host."""
    from supervise.snapshot import AGENT_ENV, TOKEN_ENV
    from supervise.tasks import run_local, unwrap

    monkeypatch.setenv(AGENT_ENV, f"ipc://{tmp_path}/some-agent.sock")
    monkeypatch.setenv(TOKEN_ENV, "the parent's")
    monkeypatch.setenv("SUPERVISE_TASK_SHARD", "0")
    spec = TaskSpec("taskfuncs:two_steps", (21,), task_id="t3")
    result = await run_local(spec, tmp_path / "t", journal="disk", env={"PYTHONPATH": str(HERE)})
    assert (unwrap(result), result.attempts) == ({"a": 42, "attempt": 1}, 1)
    assert sorted(p.name for p in (tmp_path / "t" / "journal").iterdir()) == [
        "commit-00000001.rec",
        "commit-00000002.rec",
        "outcome.rec",
    ]


def test_a_refused_commit_ends_a_fresh_worker_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A journal error out of the attempt's nursery (an ExceptionGroup) is one line and exit
    2, as for a warm worker; anything else stays a traceback."""
    from supervise.snapshot.errors import SnapshotError
    from supervise.tasks import _worker

    async def refused(*_args: Any) -> int:
        async with trio.open_nursery():
            raise SnapshotError("agent refused 'begin': task journal commit refused: lease lapsed")

    monkeypatch.setattr(_worker, "_main", refused)
    assert _worker.main([str(tmp_path), "1", "n"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lease lapsed" in err

    async def bug(*_args: Any) -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refused)
            raise KeyError("a bug of ours, not the journal's")

    monkeypatch.setattr(_worker, "_main", bug)
    with pytest.raises(BaseExceptionGroup):
        _worker.main([str(tmp_path), "1", "n"])
