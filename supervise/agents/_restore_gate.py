"""Workers' requests held while their rank's shard is fetched (`RestoreGate`): a node's
workers start while the shards they will restore still come from a peer, and a worker's first
request (its hello, which may set up its arena, then its restore) waits until its rank's shard
is in that arena, instead of racing the fetch's writes or finding nothing to restore."""

from __future__ import annotations

from collections.abc import Awaitable, Iterable

import trio

from supervise.snapshot import protocol as p
from supervise.snapshot.errors import ProtocolError


class RestoreGate:
    """Ranks whose shard is being fetched; a local request about one of them waits."""

    def __init__(self) -> None:
        self._open: dict[int, trio.Event] = {}

    def close(self, ranks: Iterable[int]) -> None:
        """Hold ``ranks``' restores from now on (their fetch begins)."""
        for rank in ranks:
            self._open.setdefault(rank, trio.Event())

    def open(self, ranks: Iterable[int] | None = None) -> None:
        """Let ``ranks``' restores through (None: every rank), fetched or not (a failed fetch
        leaves nothing to restore: the worker's restore then fails and says so)."""
        for rank in list(self._open) if ranks is None else ranks:
            event = self._open.pop(rank, None)
            if event is not None:
                event.set()

    def hold(self, frame: bytes) -> Awaitable[None] | None:
        """`serve_requests`' hold: what a request must wait for, or None (nothing fetched:
        no request is even decoded)."""
        if not self._open:
            return None
        try:
            req = p.decode_request(frame).request
        except ProtocolError:
            return None  # the handler refuses it
        event = self._open.get(getattr(req, "rank", -1))
        return None if event is None else event.wait()
