import pytest

from supervise.snapshot import RetentionRule, VersionInfo
from supervise.snapshot.retention import candidates, retained


def v(step: int, loss: float | None = None) -> VersionInfo:
    return VersionInfo(step, 0, 0.0, 1, {} if loss is None else {"loss": loss})


def test_keep_last_and_best() -> None:
    rule = RetentionRule(keep_last=2, keep_best=1, best_metric="loss", best_mode="min")
    vs = [v(1, 0.5), v(2, 0.1), v(3, 0.7), v(4, 0.9)]
    assert retained(vs, rule, head=4) == {4, 3, 2}
    assert rule.slots == 4


def test_best_mode_max_ignores_nan() -> None:
    rule = RetentionRule(keep_last=1, keep_best=1, best_metric="acc", best_mode="max")
    vs = [
        VersionInfo(1, 0, 0, 1, {"acc": 0.9}),
        VersionInfo(2, 0, 0, 1, {"acc": float("nan")}),
        VersionInfo(3, 0, 0, 1, {}),
    ]
    assert retained(vs, rule, head=3) == {3, 1}
    assert [c.step for c in candidates(vs, "best", rule, 3)] == [1]


def test_versions_past_head_are_a_rolled_back_future() -> None:
    rule = RetentionRule(keep_last=2)
    vs = [v(10), v(20), v(30), v(12)]
    # after restoring 10 and committing 12, 20 and 30 are not "latest" and are not kept
    assert retained(vs, rule, head=12) == {12, 10}
    assert [c.step for c in candidates(vs, "latest", rule, 12)] == [12, 10]
    assert [c.step for c in candidates(vs, "latest", rule, None)] == [30, 20, 12, 10]


def test_candidates_fall_back_to_older_versions() -> None:
    rule = RetentionRule(keep_last=3)
    vs = [v(1), v(5), v(3)]
    assert [c.step for c in candidates(vs, 5, rule, None)] == [5, 3, 1]
    assert [c.step for c in candidates(vs, 3, rule, None)] == [3, 1]
    assert candidates(vs, 4, rule, None) == []
    assert candidates([], "latest", rule, None) == []
    with pytest.raises(ValueError, match="which = 'newest'"):
        candidates(vs, "newest", rule, None)


def test_rule_validation() -> None:
    with pytest.raises(ValueError, match="keep_last"):
        RetentionRule(keep_last=0)
    with pytest.raises(ValueError, match="best_mode"):
        RetentionRule(best_mode="avg")  # type: ignore[arg-type]
