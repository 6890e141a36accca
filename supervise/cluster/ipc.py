"""A local request/reply endpoint: one ROUTER socket, single-frame requests, a synchronous
handler that answers each with one frame or nothing.

The node agent serves its workers' snapshot protocol on it (``SUPERVISE_AGENT``): the handler
runs on the trio thread, in arrival order, so it must be quick (the ArenaService is).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import trio
import zmq

from supervise.cluster._zsock import ZSocket

log = structlog.get_logger("supervise.cluster.ipc")

Handler = Callable[[bytes], bytes | None]


def ipc_endpoint(directory: str | os.PathLike[str], name: str) -> str:
    """``ipc://<directory>/<name>.sock``; raises ValueError if the path is too long for a
    Unix socket (about 107 bytes on Linux)."""
    path = Path(directory) / f"{name}.sock"
    if len(os.fsencode(path)) > 100:
        raise ValueError(f"ipc socket path {path} is too long (max 100 bytes): use a shorter dir")
    return f"ipc://{path}"


async def serve_requests(
    endpoint: str,
    handler: Handler,
    *,
    max_frame: int = 64 << 20,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind ``endpoint`` and answer requests until cancelled; reports the bound endpoint.

    A message that is not ``[identity, request]`` is dropped; a handler exception is logged
    and the request goes unanswered (the client times out), never ending the loop.
    """
    ctx: zmq.Context[Any] = zmq.Context()
    raw = ctx.socket(zmq.ROUTER)
    raw.linger = 0
    raw.setsockopt(zmq.MAXMSGSIZE, max_frame)
    raw.setsockopt(zmq.ROUTER_MANDATORY, 1)
    try:
        raw.bind(endpoint)
    except zmq.ZMQError as exc:
        raw.close(linger=0)
        ctx.term()
        raise OSError(exc.errno, f"cannot bind {endpoint}: {exc.strerror}") from None
    sock = ZSocket(raw)
    bound = raw.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        task_status.started(bound)
        while True:
            parts = await sock.recv_multipart()
            if len(parts) != 2:
                log.warning("dropping malformed local request", frames=len(parts))
                continue
            try:
                reply = handler(parts[1].bytes)
            except Exception:
                log.exception("local request handler failed")
                continue
            if reply is not None:
                try:
                    await sock.send_multipart([parts[0].bytes, reply])
                except zmq.ZMQError as exc:  # the requester went away
                    log.debug("local reply not delivered", error=exc.strerror)
    finally:
        sock.close()
        ctx.term()
        if bound.startswith("ipc://"):
            Path(bound.removeprefix("ipc://")).unlink(missing_ok=True)
