"""Names -> refs, one registry per trio run (a `trio.lowlevel.RunVar`), like Erlang's local
names: two `trio.run`s (two tests) never see each other's names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, overload

import trio

from supervise.runtime.errors import AlreadyRegistered

if TYPE_CHECKING:
    from supervise.runtime.server import ServerRef

R = TypeVar("R")

_names: trio.lowlevel.RunVar[dict[str, Any]] = trio.lowlevel.RunVar("supervise_registry")


def _table() -> dict[str, Any]:
    try:
        return _names.get()
    except LookupError:
        table: dict[str, Any] = {}
        _names.set(table)
        return table
    except RuntimeError:
        raise RuntimeError("the supervise registry is only available inside trio.run") from None


def register(name: str, ref: object) -> None:
    """Bind ``name`` to ``ref``; `AlreadyRegistered` if the name is taken."""
    table = _table()
    if name in table:
        raise AlreadyRegistered(name)
    table[name] = ref


def unregister(name: str, ref: object) -> None:
    """Remove ``name`` if it is still bound to ``ref`` (a newer holder keeps it)."""
    table = _table()
    if table.get(name) is ref:
        del table[name]


@overload
def whereis(name: str) -> ServerRef | None: ...


@overload
def whereis(name: str, kind: type[R]) -> R | None: ...


def whereis(name: str, kind: type[Any] | None = None) -> Any:
    """The ref registered under ``name`` in this trio run, or None.

    ``kind`` (default `ServerRef`) is the ref type expected, e.g. ``sv.SupervisorRef``; a name
    bound to another kind raises `TypeError`.
    """
    if kind is None:
        from supervise.runtime.server import ServerRef

        kind = ServerRef
    ref = _table().get(name)
    if ref is not None and not isinstance(ref, kind):
        raise TypeError(f"{name!r} is registered to a {type(ref).__name__}, not a {kind.__name__}")
    return ref


def registered() -> list[str]:
    """All names registered in this trio run, sorted."""
    return sorted(_table())
