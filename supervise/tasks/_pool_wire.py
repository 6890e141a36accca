"""The messages between a task pool and its warm workers, on a socket pair: each a msgpack
map behind a 4-byte length. The worker says `Ready` once its imports are done and after each
attempt it ran (`Done`); the pool sends one `Order` at a time. A small outcome travels back in
`Done` for the agent to commit (no round trips to the journal endpoint for a step-less task)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from typing import Any

import attrs
import msgpack

from supervise._validation import InvalidValue
from supervise.tasks.journal import Outcome, outcome_from_wire, outcome_to_wire

_LEN = struct.Struct("!I")
MAX_FRAME = 64 << 20
"""The largest message either side accepts (an order carries the task's spec)."""
HEADER = _LEN.size


def _attempt(_inst: object, _attr: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue("attempt", value, "must be an integer >= 1")


def _env(value: Mapping[str, str]) -> dict[str, str]:
    env = dict(value)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise InvalidValue("env", value, "must map str to str")
    return env


@attrs.frozen(slots=True)
class Order:
    """Run attempt ``attempt`` of the task ``spec`` (`TaskSpec.to_bytes`) as node ``node``,
    with ``env`` set in the worker's environment for the attempt only. ``fresh``: the task's
    journal holds nothing yet (the worker need not read it)."""

    spec: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))
    attempt: int = attrs.field(validator=_attempt)
    node: str = attrs.field(validator=attrs.validators.instance_of(str))
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_env)
    fresh: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))


@attrs.frozen(slots=True)
class Ready:
    """The worker can take an order: ``pid``, and how many attempts it ran so far."""

    pid: int
    ran: int = 0


@attrs.frozen(slots=True)
class Done:
    """The attempt ended in the worker: ``code`` 0 returned, 1 raised; its ``outcome`` for the
    agent to commit (None: the worker committed it to the journal itself)."""

    code: int
    outcome: Outcome | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(Outcome))
    )


Message = Order | Ready | Done


def encode(msg: Message) -> bytes:
    """``msg`` as one frame (length, then the msgpack map)."""
    if isinstance(msg, Order):
        body: dict[str, Any] = {
            "order": 1,
            "spec": msg.spec,
            "attempt": msg.attempt,
            "node": msg.node,
            "env": dict(msg.env),
            "fresh": msg.fresh,
        }
    elif isinstance(msg, Ready):
        body = {"ready": msg.pid, "ran": msg.ran}
    else:
        outcome = None if msg.outcome is None else outcome_to_wire(msg.outcome)
        body = {"done": msg.code, "outcome": outcome}
    payload: bytes = msgpack.packb(body, use_bin_type=True)
    return _LEN.pack(len(payload)) + payload


def length(header: bytes) -> int:
    """The payload length a frame header announces (ValueError past `MAX_FRAME`)."""
    (n,) = _LEN.unpack(header)
    if n > MAX_FRAME:
        raise ValueError(f"task pool frame of {n} bytes (at most {MAX_FRAME})")
    return int(n)


def decode(payload: bytes) -> Message:
    """The message of a frame's payload (ValueError when it is none)."""
    try:
        d = msgpack.unpackb(payload, raw=False)
        if "order" in d:
            return Order(d["spec"], d["attempt"], d["node"], d["env"], bool(d.get("fresh")))
        if "ready" in d:
            return Ready(int(d["ready"]), int(d["ran"]))
        outcome = d.get("outcome")
        return Done(int(d["done"]), None if outcome is None else outcome_from_wire(outcome, "Done"))
    except (KeyError, TypeError, ValueError, InvalidValue, msgpack.ExtraData) as exc:
        raise ValueError(f"not a task pool message: {exc}") from None


def recv_blocking(sock: socket.socket) -> Message | None:
    """The next message on a blocking socket (None: the other end closed it)."""
    header = _read_exactly(sock, HEADER)
    if header is None:
        return None
    payload = _read_exactly(sock, length(header))
    if payload is None:
        return None
    return decode(payload)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
