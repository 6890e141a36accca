"""The task state machine: any sequence of requested moves leaves a history that walks only
through the allowed table, refused moves change nothing and say why in one line."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervise.tasks import (
    ALLOWED,
    TERMINAL,
    InvalidTransition,
    Lifecycle,
    Reason,
    TaskState,
)

moves = st.lists(
    st.tuples(st.sampled_from(TaskState), st.sampled_from(Reason), st.floats(0, 5)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(moves)
def test_any_sequence_of_moves_walks_only_through_the_allowed_table(
    requested: list[tuple[TaskState, Reason, float]],
) -> None:
    life = Lifecycle.submitted("t1", 0.0)
    now = 0.0
    for target, reason, dt in requested:
        before = list(life.history)
        allowed = reason in ALLOWED.get((life.state, target), frozenset())
        try:
            life.move(target, reason, now + dt)
        except InvalidTransition as e:
            assert not allowed
            assert life.history == before
            assert "\n" not in str(e) and str(e).startswith("task t1: ")
        else:
            assert allowed
            now += dt
    history = life.history
    assert history[0].source is None and history[0].target is TaskState.PENDING
    for a, b in itertools.pairwise(history):
        assert b.source is a.target
        assert reason_allowed(b.source, b.target, b.reason)
        assert a.target not in TERMINAL
        assert b.at >= a.at


def reason_allowed(source: TaskState | None, target: TaskState, reason: Reason) -> bool:
    return source is not None and reason in ALLOWED.get((source, target), frozenset())


def test_the_farm_story_a_loss_then_an_error_then_completion() -> None:
    life = Lifecycle.submitted("t", 0.0)
    for target, reason in [
        (TaskState.ASSIGNED, Reason.PLACED),
        (TaskState.RUNNING, Reason.STARTED),
        (TaskState.PENDING, Reason.NODE_LOST),
        (TaskState.ASSIGNED, Reason.PLACED),
        (TaskState.RUNNING, Reason.STARTED),
        (TaskState.PAUSED, Reason.PAUSE_REQUESTED),
        (TaskState.PENDING, Reason.RESUME_REQUESTED),
        (TaskState.ASSIGNED, Reason.PLACED),
        (TaskState.RUNNING, Reason.STARTED),
        (TaskState.COMPLETED, Reason.RETURNED),
    ]:
        life.move(target, reason, 1.0)
    assert life.terminal and life.count(Reason.NODE_LOST) == 1
    with pytest.raises(InvalidTransition, match=r"completed -> pending refused: it is final"):
        life.move(TaskState.PENDING, Reason.NODE_LOST, 2.0)


def test_refusals_name_what_was_wrong() -> None:
    life = Lifecycle.submitted("t", 5.0)
    with pytest.raises(InvalidTransition, match=r"pending -> completed refused: completed is not"):
        life.move(TaskState.COMPLETED, Reason.RETURNED, 6.0)
    with pytest.raises(InvalidTransition, match=r"for reason returned \(allowed: placed\)"):
        life.move(TaskState.ASSIGNED, Reason.RETURNED, 6.0)
    with pytest.raises(InvalidTransition, match=r"earlier than the last move"):
        life.move(TaskState.ASSIGNED, Reason.PLACED, 4.0)
    with pytest.raises(ValueError, match=r"target = 'done': must be one of"):
        life.move("done", Reason.PLACED, 6.0)  # type: ignore[arg-type]
    assert life.state is TaskState.PENDING
