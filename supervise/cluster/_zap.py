"""ZAP (RFC 27) authentication on trio: accept CURVE clients whose public key is in the key
directory, refuse everyone else. One handler per zmq context (the inproc endpoint is unique).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
import trio
import zmq
from zmq.utils import z85

from supervise.cluster._zsock import ZSocket
from supervise.cluster.keys import CurveKeys

if TYPE_CHECKING:
    from supervise.cluster.stats import TransportStats

log = structlog.get_logger("supervise.cluster.zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_VERSION = b"1.0"


class ZapHandler:
    """Answers libzmq's authentication requests for the sockets of one context."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        keys: CurveKeys,
        stats: TransportStats,
        refuse: Callable[[str, int | None, str], None] | None = None,
    ) -> None:
        """``refuse(kind, sender, why)``: counts and logs a refusal (throttled; the
        transport's); without it each one is logged here."""
        self._ctx = ctx
        self._by_key = {z85.decode(pub): name for name, pub in keys.known.items()}
        self._stats = stats
        self._refuse = refuse

    def _refused(self, address: str, reason: str, **fields: str) -> None:
        self._stats.auth_refused += 1
        if self._refuse is not None:
            detail = ", ".join(f"{k} {v}" for k, v in fields.items())
            self._refuse(
                "handshake", None, f"from {address}: {reason}" + (f" ({detail})" if detail else "")
            )
        else:
            log.warning("peer refused", address=address, reason=reason, **fields)

    def decide(self, frames: list[bytes]) -> tuple[bytes, bytes, bytes, bytes]:
        """(request id, status code, status text, user id) for one ZAP request."""
        if len(frames) < 6 or frames[0] != _VERSION:
            return (frames[1] if len(frames) > 1 else b""), b"500", b"bad ZAP request", b""
        request_id, mechanism, credentials = frames[1], frames[5], frames[6:]
        address = frames[3].decode("utf-8", "replace")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._refused(address, f"mechanism {mechanism!r}")
            return request_id, b"400", b"CURVE required", b""
        name = self._by_key.get(credentials[0])
        if name is None:
            key = z85.encode(credentials[0]).decode("ascii")
            self._refused(address, "public key not in the key directory", key=key)
            return request_id, b"400", b"unknown public key", b""
        return request_id, b"200", b"OK", name.encode("utf-8")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raw = self._ctx.socket(zmq.REP)
        raw.linger = 0
        raw.bind(ZAP_ENDPOINT)
        sock = ZSocket(raw)
        task_status.started()
        try:
            while True:
                parts = await sock.recv_multipart()
                rid, code, text, user = self.decide([p.bytes for p in parts])
                await sock.send_multipart([_VERSION, rid, code, text, user, b""])
        except trio.ClosedResourceError:
            return
        finally:
            sock.close()
