"""etcd's v3 JSON gateway, encoded and decoded: base64 keys and values, int64 as strings, and
proto3's habit of leaving out every field that holds its default (0, false, empty, PUT)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from supervise.store.base import prefix_end
from supervise.store.records import (
    Compare,
    CompareTarget,
    Delete,
    Event,
    EventKind,
    Get,
    Op,
    Put,
    Record,
)

Json = dict[str, Any]

_COMPARE_FIELD: Mapping[CompareTarget, str] = {
    CompareTarget.VERSION: "version",
    CompareTarget.CREATE: "create_revision",
    CompareTarget.MOD: "mod_revision",
    CompareTarget.VALUE: "value",
    CompareTarget.LEASE: "lease",
}


def b64(data: bytes) -> str:
    """``data`` as the gateway's base64 text."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """The bytes behind the gateway's base64 text."""
    return base64.b64decode(text)


def integer(body: Mapping[str, Any], field: str) -> int:
    """An int64 field (a string on the wire; absent means 0)."""
    return int(body.get(field) or 0)


def key_range(key: str, prefix: bool) -> Json:
    """The ``key`` / ``range_end`` pair of a request."""
    raw = key.encode()
    body: Json = {"key": b64(raw)}
    if prefix:
        body["range_end"] = b64(prefix_end(raw))
    return body


def compare(guard: Compare) -> Json:
    """One ``Compare`` message."""
    value = guard.value
    encoded = b64(value) if isinstance(value, bytes) else str(value)
    return {
        "key": b64(guard.key.encode()),
        "target": guard.target.value,
        "result": guard.op.value,
        _COMPARE_FIELD[guard.target]: encoded,
    }


def request_op(op: Op) -> Json:
    """One ``RequestOp`` of a transaction."""
    if isinstance(op, Put):
        put: Json = {"key": b64(op.key.encode()), "value": b64(op.value)}
        if op.lease:
            put["lease"] = str(op.lease)
        return {"request_put": put}
    if isinstance(op, Delete):
        return {"request_delete_range": key_range(op.key, op.prefix)}
    assert isinstance(op, Get)
    return {"request_range": key_range(op.key, op.prefix)}


def txn(guards: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Json:
    """A ``TxnRequest``."""
    return {
        "compare": [compare(g) for g in guards],
        "success": [request_op(op) for op in success],
        "failure": [request_op(op) for op in failure],
    }


def record(kv: Mapping[str, Any]) -> Record:
    """A ``KeyValue`` as a `Record`."""
    return Record(
        unb64(kv["key"]).decode(),
        unb64(kv.get("value", "")),
        create_revision=integer(kv, "create_revision"),
        mod_revision=integer(kv, "mod_revision"),
        version=integer(kv, "version"),
        lease=integer(kv, "lease"),
    )


def records(body: Mapping[str, Any]) -> tuple[Record, ...]:
    """The ``kvs`` of a range response (absent when empty)."""
    return tuple(record(kv) for kv in body.get("kvs", ()))


def reads(body: Mapping[str, Any]) -> tuple[tuple[Record, ...], ...]:
    """Per op of a ``TxnResponse``: a range's records, () for a put or delete."""
    out = []
    for response in body.get("responses", ()):
        ranged = response.get("response_range")
        out.append(records(ranged) if ranged is not None else ())
    return tuple(out)


def event(body: Mapping[str, Any]) -> Event:
    """A watch ``Event`` (a PUT has no ``type`` on the wire: it is the default)."""
    kind = EventKind.DELETE if body.get("type") == "DELETE" else EventKind.PUT
    return Event(kind, record(body["kv"]))


def revision(body: Mapping[str, Any]) -> int:
    """The store revision in a response's header."""
    return integer(body.get("header", {}), "revision")
