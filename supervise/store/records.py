"""The store's data model: records with revisions, transaction parts, watch events.

Keys are text (UTF-8 on the wire), values bytes. Revisions are the store's global counter: every
change bumps it, a record remembers the revision that created it and the one that last changed it.
"""

from __future__ import annotations

import enum

import attrs

from supervise._validation import InvalidValue, enum_value, number


def _key(_inst: object, attr: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidValue(attr.name, value, "must be a non-empty string")


def _bytes(_inst: object, attr: attrs.Attribute[bytes], value: bytes) -> None:
    if not isinstance(value, bytes):
        raise InvalidValue(attr.name, value, "must be bytes")


_revision = number(ge=0, integer=True)


def _event_kind(value: EventKind | str) -> EventKind:
    return enum_value(EventKind, "kind", value)


def _compare_target(value: CompareTarget | str) -> CompareTarget:
    return enum_value(CompareTarget, "target", value)


def _compare_op(value: CompareOp | str) -> CompareOp:
    return enum_value(CompareOp, "op", value)


@attrs.frozen(slots=True)
class Record:
    """One key's current value and its history counters (etcd's ``KeyValue``)."""

    key: str = attrs.field(validator=_key)
    value: bytes = attrs.field(default=b"", validator=_bytes)
    create_revision: int = attrs.field(default=0, validator=_revision)
    mod_revision: int = attrs.field(default=0, validator=_revision)
    version: int = attrs.field(default=0, validator=_revision)
    lease: int = attrs.field(default=0, validator=_revision)


@attrs.frozen(slots=True)
class Snapshot:
    """Records read together, and the store revision they were read at."""

    records: tuple[Record, ...]
    revision: int


class EventKind(enum.StrEnum):
    """What happened to a key."""

    PUT = "put"
    DELETE = "delete"


@attrs.frozen(slots=True)
class Event:
    """One change seen by a watch; a DELETE's record carries only the key and its revision."""

    kind: EventKind = attrs.field(converter=_event_kind)
    record: Record

    @property
    def revision(self) -> int:
        """The store revision of this change."""
        return self.record.mod_revision


class CompareTarget(enum.StrEnum):
    """Which field of a key a transaction compares (etcd's names)."""

    VERSION = "VERSION"
    CREATE = "CREATE"
    MOD = "MOD"
    VALUE = "VALUE"
    LEASE = "LEASE"


class CompareOp(enum.StrEnum):
    """How a transaction compares."""

    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"


@attrs.frozen(slots=True)
class Compare:
    """A transaction's guard: ``key``'s ``target`` ``op`` ``value`` (a missing key has zeros)."""

    key: str = attrs.field(validator=_key)
    target: CompareTarget = attrs.field(converter=_compare_target)
    op: CompareOp = attrs.field(converter=_compare_op)
    value: int | bytes = 0

    def __attrs_post_init__(self) -> None:
        wants_bytes = self.target is CompareTarget.VALUE
        if wants_bytes and not isinstance(self.value, bytes):
            raise InvalidValue("value", self.value, "must be bytes to compare a VALUE")
        if not wants_bytes and (
            isinstance(self.value, bool) or not isinstance(self.value, int) or self.value < 0
        ):
            raise InvalidValue("value", self.value, f"must be an integer >= 0 for {self.target}")

    def holds(self, record: Record | None) -> bool:
        """Whether the guard holds for ``record`` (None: the key does not exist)."""
        actual: int | bytes
        if self.target is CompareTarget.VALUE:
            actual = b"" if record is None else record.value
        else:
            field = {
                CompareTarget.VERSION: "version",
                CompareTarget.CREATE: "create_revision",
                CompareTarget.MOD: "mod_revision",
                CompareTarget.LEASE: "lease",
            }[self.target]
            actual = 0 if record is None else getattr(record, field)
        if self.op is CompareOp.EQUAL:
            return actual == self.value
        if self.op is CompareOp.NOT_EQUAL:
            return actual != self.value
        if self.op is CompareOp.GREATER:
            return actual > self.value  # type: ignore[operator]
        return actual < self.value  # type: ignore[operator]


def missing(key: str) -> Compare:
    """The guard "``key`` does not exist" (its create revision is 0)."""
    return Compare(key, CompareTarget.CREATE, CompareOp.EQUAL, 0)


def created_at(key: str, revision: int) -> Compare:
    """The guard "``key`` exists and was created at ``revision``" (fences on a leadership)."""
    return Compare(key, CompareTarget.CREATE, CompareOp.EQUAL, revision)


def modified_at(key: str, revision: int) -> Compare:
    """The guard "``key`` was last changed at ``revision``" (compare-and-swap)."""
    return Compare(key, CompareTarget.MOD, CompareOp.EQUAL, revision)


@attrs.frozen(slots=True)
class Put:
    """Set ``key`` to ``value``, attached to ``lease`` (0: none) if given."""

    key: str = attrs.field(validator=_key)
    value: bytes = attrs.field(default=b"", validator=_bytes)
    lease: int = attrs.field(default=0, validator=_revision)


@attrs.frozen(slots=True)
class Delete:
    """Delete ``key``, or every key starting with it when ``prefix``."""

    key: str = attrs.field(validator=_key)
    prefix: bool = False


@attrs.frozen(slots=True)
class Get:
    """Read ``key``, or every key starting with it when ``prefix``."""

    key: str = attrs.field(validator=_key)
    prefix: bool = False


Op = Put | Delete | Get


@attrs.frozen(slots=True)
class TxnResult:
    """Whether the guards held, the revision after the transaction, and each Get's records
    (one tuple per op of the branch that ran; empty for Put and Delete)."""

    succeeded: bool
    revision: int
    reads: tuple[tuple[Record, ...], ...] = ()
