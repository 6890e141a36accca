"""ZAP (RFC 27) authentication on trio: accept CURVE clients whose public key is in the key
directory, refuse everyone else. One handler per zmq context (the inproc endpoint is unique).
"""

from __future__ import annotations

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

    def __init__(self, ctx: zmq.Context[Any], keys: CurveKeys, stats: TransportStats) -> None:
        self._ctx = ctx
        self._by_key = {z85.decode(pub): name for name, pub in keys.known.items()}
        self._stats = stats

    def decide(self, frames: list[bytes]) -> tuple[bytes, bytes, bytes, bytes]:
        """(request id, status code, status text, user id) for one ZAP request."""
        if len(frames) < 6 or frames[0] != _VERSION:
            return (frames[1] if len(frames) > 1 else b""), b"500", b"bad ZAP request", b""
        request_id, mechanism, credentials = frames[1], frames[5], frames[6:]
        address = frames[3].decode("utf-8", "replace")
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._stats.auth_refused += 1
            log.warning("peer refused", address=address, reason=f"mechanism {mechanism!r}")
            return request_id, b"400", b"CURVE required", b""
        name = self._by_key.get(credentials[0])
        if name is None:
            self._stats.auth_refused += 1
            log.warning(
                "peer refused",
                address=address,
                reason="public key not in the key directory",
                key=z85.encode(credentials[0]).decode("ascii"),
            )
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
