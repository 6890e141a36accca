import pytest

import supervise as sv


def test_backoff_sequence_doubles_to_cap() -> None:
    b = sv.Backoff(initial=1.0, max=10.0, multiplier=2.0)
    assert [b.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.delay(10_000) == 10.0


def test_backoff_jitter_bounds() -> None:
    b = sv.Backoff(initial=2.0, max=2.0, jitter=0.25)
    assert b.delay(1, 0.0) == pytest.approx(1.5)
    assert b.delay(1, 0.999999) == pytest.approx(2.5, rel=1e-5)


def test_backoff_rejects_max_below_initial() -> None:
    with pytest.raises(sv.InvalidValue, match="max"):
        sv.Backoff(initial=5.0, max=1.0)


def test_backoff_reset() -> None:
    assert sv.Backoff(reset_after=3.0).should_reset(3.0)
    assert not sv.Backoff(reset_after=3.0).should_reset(2.9)
    assert not sv.Backoff().should_reset(1e9)
