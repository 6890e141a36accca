"""The wire format: one msgpack header frame plus raw payload frames; strict, bounded decoding.

Header keys (short, msgpack map): ``p`` protocol version, ``k`` kind, ``s`` sender rank (nil for
a client), ``i`` request id (0: none), ``r`` 0 message / 1 reply / 2 error reply, ``b`` body
map, ``n`` number of payload frames, ``t`` trace context (W3C ``traceparent``/``tracestate``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import msgpack

from supervise.cluster.errors import ProtocolError
from supervise.cluster.messages import check_str_map

PROTOCOL_VERSION = 1
MESSAGE, REPLY, ERROR = 0, 1, 2
_MAX_TRACE_ITEMS = 8
_MAX_TRACE_LEN = 512
#: The highest rank a header may name (a cluster's own size is checked by the transport).
MAX_RANK = (1 << 31) - 1


@attrs.frozen(slots=True)
class Header:
    """A decoded, checked header."""

    kind: str
    sender: int | None
    request_id: int
    flag: int
    body: Any
    nframes: int
    trace: Mapping[str, str] | None


def encode_header(  # noqa: PLR0917
    kind: str,
    sender: int | None,
    request_id: int,
    flag: int,
    body: Mapping[str, Any],
    nframes: int,
    trace: Mapping[str, str] | None,
) -> bytes:
    h: dict[str, Any] = {
        "p": PROTOCOL_VERSION,
        "k": kind,
        "s": sender,
        "i": request_id,
        "r": flag,
        "b": body,
        "n": nframes,
    }
    if trace:
        h["t"] = dict(trace)
    out: bytes = msgpack.packb(h, use_bin_type=True)
    return out


def decode_header(data: bytes | memoryview, max_size: int) -> Header:
    """Parse and check a header frame; ProtocolError says what was wrong."""
    if len(data) > max_size:
        raise ProtocolError(f"header frame is {len(data)} bytes, at most {max_size} allowed")
    try:
        # Integer map keys are allowed (rank -> ...); the body's schema checks every key's type.
        h = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(h, dict):
        raise ProtocolError(f"header is {type(h).__name__}, expected a map")
    if h.get("p") != PROTOCOL_VERSION:
        raise ProtocolError(f"header protocol version {h.get('p')!r}, expected {PROTOCOL_VERSION}")
    kind, sender, rid, flag, nframes = h.get("k"), h.get("s"), h.get("i"), h.get("r"), h.get("n")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("header has no message kind")
    if sender is not None and (isinstance(sender, bool) or not isinstance(sender, int)):
        raise ProtocolError(f"{kind}: sender rank is {type(sender).__name__}, expected int or nil")
    if sender is not None and not 0 <= sender <= MAX_RANK:
        raise ProtocolError(f"{kind}: sender rank {sender} is out of range 0..{MAX_RANK}")
    if isinstance(rid, bool) or not isinstance(rid, int) or rid < 0:
        raise ProtocolError(f"{kind}: bad request id {rid!r}")
    if flag not in (MESSAGE, REPLY, ERROR) or isinstance(flag, bool):
        raise ProtocolError(f"{kind}: bad reply flag {flag!r}")
    if (flag != MESSAGE) and rid == 0:
        raise ProtocolError(f"{kind}: a reply without a request id")
    if isinstance(nframes, bool) or not isinstance(nframes, int) or nframes < 0:
        raise ProtocolError(f"{kind}: bad payload frame count {nframes!r}")
    if "b" not in h:
        raise ProtocolError(f"{kind}: header has no body")
    trace = h.get("t")
    if trace is not None:
        trace = check_str_map(
            trace, f"{kind}: trace context", max_items=_MAX_TRACE_ITEMS, max_len=_MAX_TRACE_LEN
        )
    return Header(kind, sender, rid, flag, h["b"], nframes, trace)
