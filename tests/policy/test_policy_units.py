"""Sizes and durations: parsing, normalized text that round-trips, resolution, clear errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import supervise as sv
from supervise.policy import Size, UnitError, parse_duration


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("17B", 17),
        ("64GiB", 64 << 30),
        ("512 MiB", 512 << 20),
        ("  2 KiB ", 2048),
        ("1.5GiB", 3 << 29),
        ("1TiB", 1 << 40),
    ],
)
def test_size_parses_bytes(text: int | str, nbytes: int) -> None:
    size = Size.parse(text)
    assert size.nbytes == nbytes
    assert not size.is_relative
    assert size.resolve(12345) == nbytes


def test_size_parses_percentages_and_resolves_them_exactly() -> None:
    half = Size.parse("50%")
    assert half.is_relative and half.percent == 50.0
    assert half.resolve(1001) == 500  # floor
    assert Size.parse("12.5%").resolve(1 << 40) == (1 << 40) // 8
    # 33.3% taken as written in decimal (333/1000), not as its binary float neighbour
    assert Size.parse("33.3%").resolve(10**15) == 333 * 10**12
    assert Size.parse("0%").resolve(10**12) == 0
    assert Size.parse("100%").resolve(7) == 7


def test_size_is_reexported() -> None:
    assert sv.Size is Size


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (Size(nbytes=0), "0B"),
        (Size(nbytes=1536), "1536B"),
        (Size(nbytes=64 << 30), "64GiB"),
        (Size(nbytes=3 << 29), "1536MiB"),
        (Size(percent=50), "50%"),
        (Size(percent=12.5), "12.5%"),
    ],
)
def test_size_text_is_normalized(size: Size, text: str) -> None:
    assert str(size) == text
    assert repr(size) == f"Size({text!r})"


def test_sizes_compare_by_amount() -> None:
    assert Size.parse("1GiB") == Size.parse("1024 MiB") == Size.parse(1 << 30)
    assert Size.parse("50%") == Size(percent=50.0)
    assert hash(Size.parse("1GiB")) == hash(Size.parse(1 << 30))
    assert Size.parse("1GiB") != Size.parse("50%")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("64GB", "did you mean 'GiB'?"),
        ("64 gib", "did you mean 'GiB'?"),
        ("3 parsecs", "unknown unit 'parsecs'"),
        ("101%", "between 0% and 100%"),
        ("0.5B", "whole number of bytes"),
        (-1, "must not be negative"),
        ("-1GiB", "sizes are bytes"),
        ("", "sizes are bytes"),
        ("GiB", "sizes are bytes"),
        (1.5, "sizes are bytes"),
        (True, "sizes are bytes"),
        (None, "sizes are bytes"),
        ("1e3MiB", "sizes are bytes"),
    ],
)
def test_size_rejects_with_a_reason(value: object, fragment: str) -> None:
    with pytest.raises(UnitError) as info:
        Size.parse(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_size_constructor_validates() -> None:
    with pytest.raises(UnitError, match="exactly one"):
        Size()
    with pytest.raises(UnitError, match="exactly one"):
        Size(nbytes=1, percent=1.0)
    with pytest.raises(UnitError, match="negative"):
        Size(nbytes=-1)
    with pytest.raises(UnitError, match="integer"):
        Size(nbytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match="between 0% and 100%"):
        Size(percent=100.5)
    with pytest.raises(UnitError, match="between 0% and 100%"):
        Size(percent=math.nan)


def test_resolve_rejects_a_bad_total() -> None:
    with pytest.raises(ValueError, match="total_bytes"):
        Size.parse("50%").resolve(-1)
    with pytest.raises(ValueError, match="total_bytes"):
        Size.parse("50%").resolve(1.5)  # type: ignore[arg-type]


sizes = st.one_of(
    st.integers(min_value=0, max_value=1 << 60).map(lambda n: Size(nbytes=n)),
    st.floats(min_value=0, max_value=100).map(lambda p: Size(percent=p)),
)


@given(sizes)
def test_size_text_round_trips(size: Size) -> None:
    assert Size.parse(str(size)) == size
    assert str(Size.parse(str(size))) == str(size)


@given(sizes, st.integers(min_value=0, max_value=1 << 50))
def test_resolve_stays_within_the_total(size: Size, total: int) -> None:
    resolved = size.resolve(total)
    assert isinstance(resolved, int)
    if size.is_relative:
        assert 0 <= resolved <= total
    else:
        assert resolved == size.nbytes


@given(st.integers(min_value=0, max_value=1 << 20), st.sampled_from(["B", "KiB", "MiB", "GiB"]))
def test_unit_arithmetic(n: int, unit: str) -> None:
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]
    assert Size.parse(f"{n}{unit}").nbytes == n * scale
    assert Size.parse(f"{n} {unit}").nbytes == n * scale


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        ("0.1h", 360.0),
        ("0s", 0.0),
    ],
)
def test_duration_parses(value: float | str, seconds: float) -> None:
    parsed = parse_duration(value)
    assert parsed == seconds
    assert isinstance(parsed, float)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("5 sec", "did you mean 's'?"),
        ("5min", "did you mean 'm'?"),
        ("2 hours", "did you mean 'h'?"),
        ("5d", "unknown unit 'd'"),
        ("30s1h", "largest to smallest"),
        ("1m1m", "largest to smallest"),
        ("soon", "durations are"),
        ("-5s", "durations are"),
        ("", "durations are"),
        ("1.s", "durations are"),
        (math.inf, "finite"),
        (math.nan, "finite"),
        (True, "durations are"),
        (None, "durations are"),
        ([1], "durations are"),
    ],
)
def test_duration_rejects_with_a_reason(value: object, fragment: str) -> None:
    with pytest.raises(UnitError) as info:
        parse_duration(value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@given(
    st.integers(min_value=0, max_value=99),
    st.integers(min_value=0, max_value=59),
    st.integers(min_value=0, max_value=59),
    st.integers(min_value=0, max_value=999),
)
def test_compound_durations_add_up(h: int, m: int, s: int, ms: int) -> None:
    assert parse_duration(f"{h}h{m}m{s}s{ms}ms") == pytest.approx(
        h * 3600 + m * 60 + s + ms / 1000, abs=1e-9
    )


@given(st.floats(min_value=0, max_value=1e12))
def test_numbers_are_seconds(x: float) -> None:
    assert parse_duration(x) == x
    if "e" not in repr(x):
        assert parse_duration(repr(x)) == x
