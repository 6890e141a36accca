"""Checkpoint and retry specs are validated at construction, one line per problem."""

from __future__ import annotations

import pytest

from supervise.tasks import AtMilestones, Automatic, EverySeconds, RetryPolicy, TaskPolicy
from supervise.tasks.policy import checkpoint_from_dict, checkpoint_to_dict


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: EverySeconds(0), r"seconds = 0: must be a number > 0"),
        (lambda: AtMilestones([0.5, 0.25]), r"fractions = \(0.5, 0.25\): must be strictly"),
        (lambda: AtMilestones([]), r"must be a non-empty list of fractions"),
        (lambda: AtMilestones([1.5]), r"every milestone must be a fraction in \(0, 1\]"),
        (lambda: Automatic(first=10, max=5), r"max = 5: must be >= first \(10\)"),
        (lambda: RetryPolicy(max_attempts=0), r"max_attempts = 0: must be an integer >= 1"),
        (lambda: RetryPolicy(non_retryable=["ValueError"]), r"must be a list of exception"),
        (lambda: TaskPolicy(checkpoint="every_step"), r"checkpoint = 'every_step': must be one"),
        (lambda: checkpoint_from_dict({"mode": "often"}), r"checkpoint.mode = 'often'"),
    ],
)
def test_bad_specs_are_refused_at_construction(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        build()  # type: ignore[operator]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "spec", [EverySeconds(2.5), AtMilestones((0.25, 0.5)), Automatic(first=0.5, max=8)]
)
def test_checkpoint_specs_travel_as_plain_data(spec: object) -> None:
    assert checkpoint_from_dict(checkpoint_to_dict(spec)) == spec  # type: ignore[arg-type]


def test_automatic_is_denser_early_and_sparser_late() -> None:
    gaps = [Automatic(first=1, max=10, growth=2).gap(n) for n in range(6)]
    assert gaps == [1, 2, 4, 8, 10, 10]


def test_automatic_gaps_stay_at_max_after_many_commits() -> None:
    spec = Automatic(first=0.5, max=30, growth=3)  # 3 ** 647 no longer fits a float
    assert [spec.gap(n) for n in (0, 1, 100, 700, 10**6)] == [0.5, 1.5, 30, 30, 30]
    assert Automatic(first=2, max=2, growth=1).gap(10**6) == 2
