"""Whether anything listens at a peer's endpoint (`refuses`): after a peer's connection
closed, a connect that is refused at once says its process is gone (the host answers, the
port is closed), long before its heartbeats' timeout would. Anything else (a connect that
succeeds, times out, or fails otherwise) says nothing of the sort."""

from __future__ import annotations

import errno
import socket

import trio


def _host_port(endpoint: str) -> tuple[str, int] | None:
    """``tcp://host:port`` -> (host, port); None for any other transport or a wildcard."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


async def refuses(endpoint: str, timeout: float) -> bool:  # noqa: ASYNC109
    """True when a TCP connect to ``endpoint`` is refused within ``timeout`` seconds."""
    where = _host_port(endpoint)
    if where is None:
        return False
    with trio.move_on_after(timeout):
        try:
            infos = await trio.socket.getaddrinfo(*where, type=socket.SOCK_STREAM)
        except OSError:
            return False
        if not infos:
            return False
        family, kind, proto, _, address = infos[0]
        sock = trio.socket.socket(family, kind, proto)
        try:
            await sock.connect(address)
        except OSError as exc:
            return exc.errno == errno.ECONNREFUSED
        finally:
            sock.close()
    return False
