"""Typed message kinds for the transport: attrs classes with a registered name, strict decoding.

A kind is a frozen attrs class decorated with :func:`message_kind`; its fields travel in the
msgpack header (small values only: numbers, strings, bytes, lists, maps), bulk data travels in
raw payload frames. Decoding is strict (no ``"5"`` for an int, no string for a list), and the
class's own validators run, so a malformed body never reaches a handler.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs
import cattrs

from supervise.cluster.errors import ProtocolError

T = TypeVar("T")

_KIND_ATTR = "__message_kind__"
_MAX_KIND_LEN = 128


def message_kind(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: name an attrs class as a message kind (``"replica.push_begin"``)."""
    if not isinstance(name, str) or not name or len(name) > _MAX_KIND_LEN:
        raise ValueError(f"message kind name must be a non-empty string of <= 128 chars: {name!r}")

    def mark(cls: type[T]) -> type[T]:
        if not attrs.has(cls):
            raise TypeError(f"message kind {name!r}: {cls.__qualname__} is not an attrs class")
        setattr(cls, _KIND_ATTR, name)
        return cls  # type: ignore[return-value]

    return mark


def kind_of(cls: type[Any]) -> str:
    """The registered name of a message class."""
    name = getattr(cls, _KIND_ATTR, None)
    if not isinstance(name, str):
        raise TypeError(
            f"{cls.__qualname__} is not a message kind (decorate it with @message_kind)"
        )
    return name


def _strict_scalar(expected: type[Any]) -> Callable[[Any, Any], Any]:
    def hook(value: Any, _type: Any) -> Any:
        if expected is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"expected a number, got {type(value).__name__}")
            return float(value)
        if expected is int and isinstance(value, bool):
            raise TypeError("expected an integer, got bool")
        if not isinstance(value, expected):
            raise TypeError(f"expected {expected.__name__}, got {type(value).__name__}")
        return value

    return hook


def _is_sequence_type(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def _is_mapping_type(tp: Any) -> bool:
    return typing.get_origin(tp) is dict


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    for scalar in (int, float, str, bytes, bool):
        conv.register_structure_hook(scalar, _strict_scalar(scalar))

    def seq_factory(tp: Any) -> Callable[[Any, Any], Any]:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)

        def hook(value: Any, _t: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise TypeError(f"expected {len(args)} items, got {len(value)}")
                return tuple(conv.structure(v, a) for v, a in zip(value, args, strict=True))
            item = args[0] if args else Any
            items = [conv.structure(v, item) for v in value]
            return tuple(items) if origin is tuple else items

        return hook

    def map_factory(tp: Any) -> Callable[[Any, Any], Any]:
        args = typing.get_args(tp)
        key_t, val_t = args if args else (Any, Any)

        def hook(value: Any, _t: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected a map, got {type(value).__name__}")
            return {conv.structure(k, key_t): conv.structure(v, val_t) for k, v in value.items()}

        return hook

    def any_hook(value: Any, _t: Any) -> Any:
        return value

    conv.register_structure_hook_factory(_is_sequence_type, seq_factory)
    conv.register_structure_hook_factory(_is_mapping_type, map_factory)
    conv.register_structure_hook_func(lambda tp: tp is Any, any_hook)

    def is_tuple(tp: Any) -> bool:
        return typing.get_origin(tp) is tuple or tp is tuple

    conv.register_unstructure_hook_func(is_tuple, list)
    return conv


_converter = _make_converter()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc))
    return f"{type(exc).__name__}: {exc}"


class KindRegistry:
    """Names -> message classes, for one transport (a client or an agent)."""

    __slots__ = ("_by_name",)

    def __init__(self, kinds: Iterable[type[Any]] = ()) -> None:
        self._by_name: dict[str, type[Any]] = {}
        self.register(*kinds)

    def register(self, *classes: type[Any]) -> None:
        """Register message classes; a name already taken by another class is an error."""
        for cls in classes:
            name = kind_of(cls)
            known = self._by_name.get(name)
            if known is not None and known is not cls:
                raise ValueError(
                    f"message kind {name!r} is already registered to {known.__qualname__}"
                )
            self._by_name[name] = cls

    def get(self, name: str) -> type[Any] | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def encode(self, message: object) -> tuple[str, dict[str, Any]]:
        """(kind name, body map) of a message instance; registers its class on first use."""
        cls = type(message)
        name = kind_of(cls)
        if self._by_name.get(name) is not cls:
            self.register(cls)
        body = _converter.unstructure(message)
        if not isinstance(body, dict):  # pragma: no cover - attrs classes always give a dict
            raise TypeError(f"{name}: body must unstructure to a map")
        return name, body

    def decode(self, name: str, body: object) -> object:
        """Build the message instance for kind ``name``; ProtocolError names what was wrong."""
        cls = self._by_name.get(name)
        if cls is None:
            raise ProtocolError(f"unknown message kind {name!r}")
        if not isinstance(body, dict):
            raise ProtocolError(f"{name}: body is {type(body).__name__}, expected a map")
        try:
            return _converter.structure(body, cls)
        except Exception as exc:
            raise ProtocolError(f"{name}: bad body: {_one_line(exc)}") from None


def check_str_map(value: object, what: str, *, max_items: int, max_len: int) -> dict[str, str]:
    """A small map of strings (trace context); ProtocolError otherwise."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is {type(value).__name__}, expected a map")
    if len(value) > max_items:
        raise ProtocolError(f"{what} has {len(value)} entries, at most {max_items} allowed")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ProtocolError(f"{what} must map strings to strings")
        if len(k) > max_len or len(v) > max_len:
            raise ProtocolError(f"{what} entry {k[:40]!r} is longer than {max_len} chars")
    return value


def frozen_map(value: Mapping[str, str] | None) -> Mapping[str, str]:
    """An immutable view of a (possibly absent) string map."""
    return types.MappingProxyType(dict(value or {}))
