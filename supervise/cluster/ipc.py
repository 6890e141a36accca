"""A local request/reply endpoint: one ROUTER socket, single-frame requests, a synchronous
handler that answers each with one frame or nothing.

The node agent serves its workers' snapshot protocol on it (``SUPERVISE_AGENT``): the handler
runs on the trio thread, in arrival order, so it must be quick (the ArenaService is).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
import trio
import zmq

from supervise.cluster._zsock import ZSocket

log = structlog.get_logger("supervise.cluster.ipc")

Handler = Callable[[bytes], bytes | None]
AsyncHandler = Callable[[bytes], Awaitable[bytes | None]]
Hold = Callable[[bytes], Awaitable[None] | None]


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
    hold: Hold | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind ``endpoint`` and answer requests until cancelled; reports the bound endpoint.

    A message that is not ``[identity, request]`` is dropped; a handler exception is logged
    and the request goes unanswered (the client times out), never ending the loop.
    ``hold(frame)``: None to handle the request now, in arrival order (the rule), or an
    awaitable to handle it once that is done, in a task of its own (a restore waiting for
    its shard's fetch) while the other requests go on.
    """
    async with _bound(endpoint, max_frame) as (sock, bound), trio.open_nursery() as nursery:
        sending = trio.Lock()

        async def send(identity: bytes, reply: bytes | None) -> None:
            if reply is not None:
                async with sending:
                    await _send(sock, identity, reply)

        async def later(identity: bytes, frame: bytes, until: Awaitable[None]) -> None:
            await until
            try:
                reply = handler(frame)
            except Exception:
                log.exception("local request handler failed")
                return
            await send(identity, reply)

        task_status.started(bound)
        while True:
            parts = await sock.recv_multipart()
            if len(parts) != 2:
                log.warning("dropping malformed local request", frames=len(parts))
                continue
            frame = parts[1].bytes
            until = None if hold is None else hold(frame)
            if until is not None:
                nursery.start_soon(later, parts[0].bytes, frame, until)
                continue
            try:
                reply = handler(frame)
            except Exception:
                log.exception("local request handler failed")
                continue
            await send(parts[0].bytes, reply)


async def serve_deferred(
    endpoint: str,
    handler: AsyncHandler,
    *,
    max_frame: int = 64 << 20,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`serve_requests` for a handler that may wait before it answers (a farm node answers a
    task's commit once its group peers hold it): each request is handled in a task of its
    own, and its reply goes out when ready (requests of one client stay in order: a client
    waits for each reply)."""
    async with _bound(endpoint, max_frame) as (sock, bound), trio.open_nursery() as nursery:
        sending = trio.Lock()

        async def answer(identity: bytes, frame: bytes) -> None:
            try:
                reply = await handler(frame)
            except Exception:
                log.exception("local request handler failed")
                return
            if reply is not None:
                async with sending:
                    await _send(sock, identity, reply)

        task_status.started(bound)
        while True:
            parts = await sock.recv_multipart()
            if len(parts) != 2:
                log.warning("dropping malformed local request", frames=len(parts))
                continue
            nursery.start_soon(answer, parts[0].bytes, parts[1].bytes)


async def _send(sock: ZSocket, identity: bytes, reply: bytes) -> None:
    try:
        await sock.send_multipart([identity, reply])
    except zmq.ZMQError as exc:  # the requester went away
        log.debug("local reply not delivered", error=exc.strerror)


@asynccontextmanager
async def _bound(endpoint: str, max_frame: int) -> AsyncIterator[tuple[ZSocket, str]]:
    """A ROUTER socket bound to ``endpoint`` (and the endpoint it reports) for the block;
    closed, and its socket file removed, after it."""
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
        yield sock, bound
    finally:
        sock.close()
        ctx.term()
        if bound.startswith("ipc://"):
            Path(bound.removeprefix("ipc://")).unlink(missing_ok=True)
