"""The worker <-> node agent local protocol: msgpack maps over a zmq DEALER/ROUTER pair.

A request is ``{"op": <name>, "id": <int>, ...fields}``; the agent answers every request but
``heartbeat`` with ``{"id": <same>, "ok": true, ...}`` or ``{"id": ..., "ok": false,
"error": "<one line>"}``. Messages (fields in the classes below):

- ``hello``: a worker introduces itself -> the agent's policy (as a dict) and the versions
  it holds for that rank;
- ``attach``: make sure an arena with room for ``nbytes`` exists -> its path and geometry;
- ``begin`` -> a free slot to write into (``arena`` null when none is free right now);
- ``commit``: the slot is filled and checksummed, here is its manifest;
- ``abort``: give a slot back unwritten;
- ``heartbeat``: the training step and metrics (no reply; dropped when the agent is slow);
- ``pause``: a long phase (evaluation, a checkpoint to disk) starts (``paused`` true) or ended:
  meanwhile the hang detector applies only the heartbeat timeout (`Snapshotter.pause`);
- ``restore``: which version to load -> candidates, the chosen one first, then fallbacks;
- ``restored`` / ``corrupt``: the outcome of a restore attempt;
- ``versions`` -> the versions held for the rank.

Under a node agent every request also carries ``"token"``: the worker's token from
``SUPERVISE_AGENT_TOKEN``, which the agent issued for one rank and generation; a request for
any other rank, or without a valid token, is refused (see `ArenaService`). Fields are checked
on construction and on decoding: ranks and versions are integers >= 0, a rank is below the
world size, ``which`` is "latest", "best" or a version.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Final, Union

import attrs
import msgpack

from supervise.snapshot.errors import ProtocolError
from supervise.snapshot.retention import VersionInfo
from supervise.telemetry import Source

MAX_FRAME: Final = 64 << 20
AGENT_ENV: Final = "SUPERVISE_AGENT"
"""The environment variable naming the node agent's local endpoint (set for its workers)."""
TOKEN_ENV: Final = "SUPERVISE_AGENT_TOKEN"
"""The environment variable holding a worker's token: its rank's credential at the agent."""
MAX_RANK: Final = (1 << 31) - 1
"""The largest rank (torch.distributed's ranks are 32-bit)."""
_MAX_INT: Final = (1 << 63) - 1
_WHICH: Final = ("latest", "best")
_SOURCES: Final = (Source.LOCAL.value, Source.DISK.value)  # what a worker may commit from


def _count(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    """A step, size, slot or generation: an integer in [0, 2**63)."""
    if isinstance(value, int) and not 0 <= value <= _MAX_INT:
        raise ValueError(f"{attribute.name} = {value}: must be an integer >= 0")


def _rank(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, int) and not 0 <= value <= MAX_RANK:
        raise ValueError(f"{attribute.name} = {value}: must be in [0, {MAX_RANK}]")


def _which(_inst: object, _attribute: attrs.Attribute[str | int], value: str | int) -> None:
    if isinstance(value, bool) or (
        value not in _WHICH and not (isinstance(value, int) and 0 <= value <= _MAX_INT)
    ):
        raise ValueError(f"which = {value!r}: must be 'latest', 'best' or a version number >= 0")


def _source(_inst: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if value not in _SOURCES:
        raise ValueError(f"source = {value!r}: must be one of {', '.join(_SOURCES)}")


@attrs.frozen(slots=True)
class Hello:
    """A worker (re)started: who it is."""

    OP: ClassVar[str] = "hello"
    rank: int = attrs.field(validator=_rank)
    local_rank: int = attrs.field(validator=_rank)
    world_size: int = attrs.field(validator=_rank)
    generation: int = attrs.field(validator=_count)
    pid: int = attrs.field(validator=_count)

    def __attrs_post_init__(self) -> None:
        if self.world_size < 1 or max(self.rank, self.local_rank) >= self.world_size:
            raise ValueError(
                f"rank {self.rank} (local rank {self.local_rank}) must be below the world "
                f"size {self.world_size}"
            )


@attrs.frozen(slots=True)
class Attach:
    """Make sure the rank's current arena holds ``nbytes`` per slot."""

    OP: ClassVar[str] = "attach"
    rank: int = attrs.field(validator=_rank)
    nbytes: int = attrs.field(validator=_count)
    manifest_capacity: int = attrs.field(validator=_count)


@attrs.frozen(slots=True)
class Begin:
    """Ask for a free slot to write the next capture into."""

    OP: ClassVar[str] = "begin"
    rank: int = attrs.field(validator=_rank)


@attrs.frozen(slots=True)
class Commit:
    """A slot is filled and checksummed: commit it with this manifest."""

    OP: ClassVar[str] = "commit"
    rank: int = attrs.field(validator=_rank)
    arena: str
    slot: int = attrs.field(validator=_count)
    manifest: bytes
    source: str = attrs.field(validator=_source, default="local")


@attrs.frozen(slots=True)
class Abort:
    """Give a slot from ``begin`` back without committing it."""

    OP: ClassVar[str] = "abort"
    rank: int = attrs.field(validator=_rank)
    arena: str
    slot: int = attrs.field(validator=_count)


@attrs.frozen(slots=True)
class Heartbeat:
    """Training progress; the Monitor's liveness and NaN signal. Never answered."""

    OP: ClassVar[str] = "heartbeat"
    rank: int = attrs.field(validator=_rank)
    step: int = attrs.field(validator=_count)
    metrics: dict[str, float]


@attrs.frozen(slots=True)
class Pause:
    """A long phase starts (``paused``) or ended: no adaptive hang verdict meanwhile."""

    OP: ClassVar[str] = "pause"
    rank: int
    paused: bool


@attrs.frozen(slots=True)
class Restore:
    """Which version to load: "latest", "best" or a version number."""

    OP: ClassVar[str] = "restore"
    rank: int = attrs.field(validator=_rank)
    which: str | int = attrs.field(validator=_which)


@attrs.frozen(slots=True)
class Restored:
    """The worker loaded version ``step``: the timeline is now there."""

    OP: ClassVar[str] = "restored"
    rank: int = attrs.field(validator=_rank)
    step: int = attrs.field(validator=_count)


@attrs.frozen(slots=True)
class Corrupt:
    """Version ``step`` failed verification; drop it."""

    OP: ClassVar[str] = "corrupt"
    rank: int = attrs.field(validator=_rank)
    step: int = attrs.field(validator=_count)
    reason: str


@attrs.frozen(slots=True)
class Versions:
    """List the versions held for a rank."""

    OP: ClassVar[str] = "versions"
    rank: int = attrs.field(validator=_rank)


Request = Union[  # noqa: UP007 (a runtime value, used for isinstance-free dispatch tables)
    Hello, Attach, Begin, Commit, Abort, Heartbeat, Pause, Restore, Restored, Corrupt, Versions
]
REQUESTS: Final[dict[str, type[Any]]] = {
    c.OP: c
    for c in (
        Hello,
        Attach,
        Begin,
        Commit,
        Abort,
        Heartbeat,
        Pause,
        Restore,
        Restored,
        Corrupt,
        Versions,
    )
}


def _check(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for h in typing.get_args(hint):
            try:
                return _check(value, h, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: unexpected value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(value).__name__}")
        return {
            _check(k, str, where): float(_check(v, int | float, f"{where}.{k}"))
            for k, v in value.items()
        }
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, hint):
        raise ProtocolError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


_HINTS: Final = {op: typing.get_type_hints(cls) for op, cls in REQUESTS.items()}


@attrs.frozen(slots=True)
class Envelope:
    """A decoded request with its id and the token it came with ("" when none)."""

    id: int
    token: str
    request: Request


def encode_request(req: Request, request_id: int, token: str = "") -> bytes:
    """Wire form of a request (``token``: the worker's, from `TOKEN_ENV`)."""
    body = {"op": req.OP, "id": request_id, **attrs.asdict(req, recurse=False)}
    if token:
        body["token"] = token
    out: bytes = msgpack.packb(body, use_bin_type=True)
    return out


def decode_request(frame: bytes) -> Envelope:
    """Parse and validate a request frame; ProtocolError names what is wrong."""
    if len(frame) > MAX_FRAME:
        raise ProtocolError(f"request of {len(frame)} bytes exceeds {MAX_FRAME}")
    try:
        raw = msgpack.unpackb(frame, raw=False)
    except Exception as exc:
        raise ProtocolError(f"request is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("request is not a map")
    op = raw.pop("op", None)
    rid = raw.pop("id", None)
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ProtocolError(f"request id {rid!r} is not an integer")
    token = raw.pop("token", "")
    if not isinstance(token, str):
        raise ProtocolError(f"request token is not a string: {type(token).__name__}")
    cls = REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown op {op!r}; known: {', '.join(REQUESTS)}")
    hints = _HINTS[op]
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ProtocolError(f"{op}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is attrs.NOTHING:
                raise ProtocolError(f"{op}: missing field {name!r}")
            continue
        kwargs[name] = _check(raw[name], hints[name], f"{op}.{name}")
    try:
        return Envelope(rid, token, cls(**kwargs))
    except ValueError as exc:
        raise ProtocolError(f"{op}: {exc}") from None


def encode_reply(request_id: int, body: Mapping[str, Any]) -> bytes:
    """Wire form of a successful reply."""
    out: bytes = msgpack.packb({"id": request_id, "ok": True, **body}, use_bin_type=True)
    return out


def encode_error(request_id: int | None, message: str) -> bytes:
    """Wire form of a failed request (one line)."""
    line = " ".join(message.split())
    out: bytes = msgpack.packb({"id": request_id, "ok": False, "error": line}, use_bin_type=True)
    return out


def decode_reply(frame: bytes) -> dict[str, Any]:
    """Parse a reply frame (``ok``/``error`` left for the caller to interpret)."""
    try:
        raw = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolError(f"reply is not valid msgpack: {exc}") from None
    if not isinstance(raw, dict) or "ok" not in raw:
        raise ProtocolError("reply is not a map with 'ok'")
    return raw


def info_to_wire(v: VersionInfo) -> dict[str, Any]:
    """A VersionInfo as a msgpack-able map."""
    return {
        "step": v.step,
        "generation": v.generation,
        "wall_time": v.wall_time,
        "nbytes": v.nbytes,
        "metrics": dict(v.metrics),
        "source": v.source,
    }


def info_from_wire(raw: Any) -> VersionInfo:
    """Inverse of ``info_to_wire``; ProtocolError on a malformed map."""
    try:
        return VersionInfo(
            step=_check(raw["step"], int, "version.step"),
            generation=_check(raw["generation"], int, "version.generation"),
            wall_time=_check(raw["wall_time"], float, "version.wall_time"),
            nbytes=_check(raw["nbytes"], int, "version.nbytes"),
            metrics=_check(raw["metrics"], dict[str, float], "version.metrics"),
            source=_check(raw["source"], str, "version.source"),
        )
    except (KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed version record: {exc}") from None
