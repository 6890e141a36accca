"""The runner's decisions, in virtual time: application errors retry after the policy's
backoff and resume after the committed steps; non-retryable types fail at once; losses requeue
without spending the retry budget and dead-letter past their bound."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import taskfuncs
import trio

from supervise.runtime import Backoff
from supervise.tasks import (
    AttemptEnd,
    InProcess,
    InvalidTransition,
    Manual,
    MemoryJournal,
    Outcome,
    Reason,
    RetryPolicy,
    TaskFailed,
    TaskPolicy,
    TaskResult,
    TaskRunner,
    TaskSpec,
    TaskState,
    unwrap,
)

BACKOFF = Backoff(initial=2.0, max=10.0, multiplier=3.0, jitter=0.5)


@pytest.fixture(autouse=True)
def _fresh_counters() -> Iterator[None]:
    taskfuncs.CALLS.clear()
    taskfuncs.FAIL_TIMES.clear()
    yield


def _spec(kind: str = "value", **retry: object) -> TaskSpec:
    policy = TaskPolicy(retry=RetryPolicy(backoff=BACKOFF, **retry))  # type: ignore[arg-type]
    return TaskSpec("taskfuncs:two_steps", (21,), {"kind": kind}, task_id="t", policy=policy)


async def test_errors_retry_after_the_backoff_and_resume_after_committed_steps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    taskfuncs.FAIL_TIMES["explode"] = 2
    spec = _spec(max_attempts=3)
    starts: list[float] = []
    journal = MemoryJournal()
    launcher = InProcess(spec, journal)

    async def timed(attempt: int) -> AttemptEnd:
        starts.append(trio.current_time())
        return await launcher(attempt)

    timed.node = "local"  # type: ignore[attr-defined]
    runner = TaskRunner(spec, timed, uniform=lambda: 0.5)  # type: ignore[arg-type]
    result = await runner.run()
    assert unwrap(result) == {"a": 42, "attempt": 3}
    assert [b - a for a, b in itertools.pairwise(starts)] == [2.0, 6.0]
    assert taskfuncs.CALLS == {"double": 1, "explode": 3}  # the first step ran once
    assert [t.reason for t in result.history if t.target is TaskState.PENDING] == [
        Reason.SUBMITTED,
        Reason.APP_ERROR,
        Reason.APP_ERROR,
    ]


async def test_retries_run_out_and_non_retryable_types_fail_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    taskfuncs.FAIL_TIMES["explode"] = 9
    spec = _spec(max_attempts=2)
    result = await TaskRunner(spec, InProcess(spec, MemoryJournal())).run()
    assert (result.state, result.attempts) == (TaskState.FAILED, 2)
    assert result.history[-1].reason is Reason.RETRIES_EXHAUSTED
    with pytest.raises(TaskFailed, match=r"^task t failed \(retries_exhausted\): builtins\.Val"):
        unwrap(result)

    spec = _spec("key", non_retryable=(LookupError,))
    result = await TaskRunner(spec, InProcess(spec, MemoryJournal())).run()
    assert (result.state, result.attempts) == (TaskState.FAILED, 1)
    assert result.history[-1].reason is Reason.NON_RETRYABLE

    spec = TaskSpec("taskfuncs:bad_result", task_id="t")  # deterministic: never retried
    result = await TaskRunner(spec, InProcess(spec, MemoryJournal())).run()
    assert result.history[-1].reason is Reason.NON_RETRYABLE
    assert result.error.endswith("result.features[3]: set is not supported")


class _Script:
    """A launcher that replays a script of attempt ends (lost / error / ok)."""

    node = "n1"

    def __init__(self, *ends: str) -> None:
        self.ends = list(ends)

    async def __call__(self, attempt: int) -> AttemptEnd:
        await trio.sleep(1)
        end = self.ends.pop(0)
        if end == "lost":
            return AttemptEnd(None, lost="worker killed")
        if end == "error":
            return AttemptEnd(Outcome(attempt, error_mro=("builtins.OSError",), message="x"))
        return AttemptEnd(Outcome(attempt, value=b"\x01"))


async def test_losses_do_not_spend_the_retry_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = _spec(max_attempts=2, max_losses=3)
    script = _Script("lost", "error", "lost", "lost", "ok")
    result = await TaskRunner(spec, script).run()
    assert (result.state, result.value, result.attempts) == (TaskState.COMPLETED, 1, 5)
    assert sum(t.reason is Reason.NODE_LOST for t in result.history) == 3


async def test_a_task_lost_too_often_is_dead_lettered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = _spec(max_losses=2)
    result = await TaskRunner(spec, _Script("lost", "lost", "lost", "ok")).run()
    assert (result.state, result.attempts) == (TaskState.FAILED, 3)
    assert result.history[-1].reason is Reason.DEAD_LETTER
    assert result.error == "worker killed"


def test_a_bad_spec_fails_at_submit_time() -> None:
    with pytest.raises(ValueError, match=r"^task target 'stages\.pipeline': must be MODULE:FUNC"):
        TaskSpec("stages.pipeline")
    with pytest.raises(TypeError, match=r"^kwargs\.data: set is not supported$"):
        TaskSpec("stages:pipeline", kwargs={"data": {1}})
    with pytest.raises(ValueError, match=r"^kwargs = \{1: 2\}: key 1 is not a keyword argument"):
        TaskSpec("stages:pipeline", kwargs={1: 2})
    for bad in ("..", ".", "a/b", ".hidden", ""):  # a task id names directories and arenas
        with pytest.raises(ValueError, match=r"^task_id = .*: use 1-128 letters, digits"):
            TaskSpec("stages:pipeline", task_id=bad)


async def _run_with(runner: TaskRunner, *actions: tuple[float, str]) -> TaskResult:
    """Run ``runner`` while calling its pause/resume/cancel at the given virtual times."""
    result: list[TaskResult] = []

    async def go() -> None:
        result.append(await runner.run())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(go)
        t0 = trio.current_time()
        for at, action in actions:
            await trio.sleep_until(t0 + at)
            getattr(runner, action)()
    return result[0]


def _path(result: TaskResult) -> list[str]:
    return [f"{t.target}:{t.reason}" for t in result.history]


async def test_pause_stops_the_attempt_resume_goes_on_cancel_ends_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = _spec()
    result = await _run_with(TaskRunner(spec, _Script("ok", "ok")), (0.5, "pause"), (9, "resume"))
    assert _path(result) == [
        "pending:submitted",
        "assigned:placed",
        "running:started",
        "paused:pause_requested",  # at 0.5 s, mid-attempt: the attempt is stopped
        "pending:resume_requested",  # at 9 s
        "assigned:placed",
        "running:started",
        "completed:returned",
    ]
    assert (result.history[3].at, result.history[4].at) == (0.5, 9.0)
    assert result.attempts == 2  # a stopped attempt is neither an error nor a loss

    runner = TaskRunner(spec, _Script("error", "ok"))  # cancelled while waiting to retry
    result = await _run_with(runner, (1.5, "pause"), (2, "cancel"))
    assert _path(result)[-3:] == [
        "pending:app_error",
        "paused:pause_requested",
        "cancelled:cancel_requested",
    ]
    with pytest.raises(
        InvalidTransition, match=r"^task t: cancelled -> pending refused: it is final"
    ):
        runner.resume()

    result = await _run_with(TaskRunner(spec, _Script("ok")), (0.5, "cancel"))
    assert _path(result)[-1] == "cancelled:cancel_requested" and result.attempts == 1


async def test_in_process_a_bad_target_fails_at_once_and_a_pause_commits_finished_steps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    spec = TaskSpec("taskfuncs:nope", task_id="t")
    result = await TaskRunner(spec, InProcess(spec)).run()
    assert (result.history[-1].reason, result.attempts) == (Reason.NON_RETRYABLE, 1)
    assert result.error.endswith("'taskfuncs:nope': taskfuncs has no nope")
    spec = TaskSpec("taskfuncs:double", task_id="t")  # a plain function: never called
    result = await TaskRunner(spec, InProcess(spec)).run()
    assert (result.history[-1].reason, result.attempts) == (Reason.NON_RETRYABLE, 1)
    assert result.error.endswith(
        "'taskfuncs:double': not an async function (define it `async def f(ctx, ...)`)"
    )
    assert taskfuncs.CALLS["double"] == 0
    for args, kwargs, why in [
        ((1, 2, 3), {}, "too many positional arguments"),
        ((), {}, "missing a required argument: 'x'"),
        ((1,), {"colour": "red"}, "got an unexpected keyword argument 'colour'"),
    ]:
        spec = TaskSpec("taskfuncs:two_steps", args, kwargs, task_id="t")
        result = await TaskRunner(spec, InProcess(spec)).run()
        assert (result.history[-1].reason, result.attempts) == (Reason.NON_RETRYABLE, 1)
        assert "its arguments do not fit two_steps(ctx: 'TaskContext', x: 'int'" in result.error
        assert result.error.endswith(why)
    assert taskfuncs.CALLS["double"] == 0

    spec = TaskSpec("taskfuncs:ticks", [4], task_id="t", policy=TaskPolicy(checkpoint=Manual()))
    runner = TaskRunner(spec, InProcess(spec))
    result = await _run_with(runner, (2.5, "pause"), (5, "resume"))
    assert unwrap(result) == [0, 1, 2, 3]
    assert taskfuncs.CALLS["tick"] == 4  # s0 and s1 were committed by the pause, not run again


class _Finishing:
    """An attempt whose end cannot be interrupted (like a journal write in a thread): a
    pause or cancel asked for meanwhile arrives after it returned ``end``."""

    node = "local"

    def __init__(self, end: str) -> None:
        self.end = end

    async def __call__(self, attempt: int) -> AttemptEnd:
        with trio.CancelScope(shield=True):
            await trio.sleep(1)
        if self.end == "error":
            return AttemptEnd(Outcome(attempt, error_mro=("builtins.OSError",), message="x"))
        return AttemptEnd(Outcome(attempt, value=b"\x07"))


@pytest.mark.parametrize("action", ["pause", "cancel"])
async def test_a_request_that_arrives_as_the_task_ends_leaves_its_final_state(
    autojump_clock: trio.testing.MockClock, action: str
) -> None:
    result = await _run_with(TaskRunner(_spec(), _Finishing("ok")), (0.5, action))
    assert (result.state, result.value) == (TaskState.COMPLETED, 7)
    spec = _spec(max_attempts=1)
    result = await _run_with(TaskRunner(spec, _Finishing("error")), (0.5, action))
    assert (result.state, result.history[-1].reason) == (TaskState.FAILED, Reason.RETRIES_EXHAUSTED)


async def test_a_resume_right_after_a_pause_lets_the_pause_finish_then_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """resume() before the pause took effect: the attempt was already stopped, so the task
    passes through paused and on (it tried running -> assigned and raised InvalidTransition)."""
    spec = TaskSpec("taskfuncs:ticks", [4], task_id="t", policy=TaskPolicy(checkpoint=Manual()))
    runner = TaskRunner(spec, InProcess(spec))
    before = taskfuncs.CALLS["tick"]
    result = await _run_with(runner, (2.5, "pause"), (2.5, "resume"))
    assert unwrap(result) == [0, 1, 2, 3]
    assert taskfuncs.CALLS["tick"] - before == 4  # what the pause committed did not run again
    assert [t.target for t in result.history].count(TaskState.PAUSED) == 1
