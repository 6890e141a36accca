"""Task values: msgpack plus bytes and numpy arrays as raw buffers, types kept, no pickle; what
cannot go is a one-line error naming where it sits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervise.tasks import CorruptValue, UnsupportedValue, decode, encode

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text() | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(plain)
def test_plain_values_come_back_equal_with_their_types(value: object) -> None:
    back = decode(encode(value))
    assert back == value
    assert type(back) is type(value)


def test_numpy_arrays_and_scalars_come_back_bit_for_bit() -> None:
    value = {
        "x": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],  # not contiguous
        "y": np.array([True, False]),
        "n": np.int64(-3),
        "f": np.float64(0.1),
        "empty": np.zeros((0, 3), np.uint8),
    }
    back = decode(encode(value))
    for k, v in value.items():
        assert type(back[k]) is type(v)
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
    back["x"][0, 0] = 9  # a writable copy, not a view of the bytes


def _cycle() -> list[object]:
    loop: list[object] = []
    loop.append(loop)
    return loop


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_values_up_to_the_limit_come_back() -> None:
    assert decode(encode(_nested(200))) == _nested(200)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"features": [1, 2, 3, {1}]}, r"^result\.features\[3\]: set is not supported$"),
        ({"a b": object()}, r"^result\['a b'\]: object is not supported$"),
        ({(1, 2): 1}, r"^result: dict key \(1, 2\) \(tuple\) is not supported"),
        ([np.array([object()])], r"^result\[0\]: numpy dtype object is not supported$"),
        (2**64, r"^result: int 18446744073709551616 does not fit in 64 bits$"),
        ({"m": {2**70: 1}}, r"^result\.m: dict key 1180591620717411303424 does not fit in 64"),
        (_cycle(), r"^result(\[0\])+\.\.\.: nested more than 200 levels deep \(a cycle\?\)$"),
        (_nested(201), r": nested more than 200 levels deep"),
    ],
)
def test_what_cannot_go_is_named_by_its_path(value: object, message: str) -> None:
    with pytest.raises(UnsupportedValue, match=message):
        encode(value, "result")


def test_bytes_it_did_not_write_are_a_one_line_error() -> None:
    with pytest.raises(CorruptValue, match=r"^not a task value"):
        decode(b"\xc1")
