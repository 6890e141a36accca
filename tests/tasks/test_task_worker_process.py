"""Attempts in real worker processes with the journal on disk: an attempt that raised after a
committed step is retried in a new process, which gets the step back instead of running it."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervise.runtime import Backoff
from supervise.tasks import (
    Reason,
    RetryPolicy,
    TaskPolicy,
    TaskSpec,
    TaskState,
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
