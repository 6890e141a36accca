"""A replica kept in the buffers it arrived in: received bytes are verified where they lie
and never copied.

Copying each chunk into a buffer of the store's own was about half of a holder's CPU per byte
(RESULTS.md, replication): libzmq already received every chunk into a buffer of its size, so
the replica is that list of buffers. Serving a range returns views of them (zero-copy).
"""

from __future__ import annotations

import bisect

#: Smaller pieces are copied: a small frame may share (and pin) a larger receive buffer.
HOLD_MIN = 64 << 10


class Held:
    """The data region of one shard as consecutive pieces; ``capacity``: the bytes budgeted."""

    __slots__ = ("_pieces", "_starts", "capacity", "nbytes")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.nbytes = 0
        self._pieces: list[memoryview] = []
        self._starts: list[int] = []

    def append(self, data: memoryview) -> None:
        """Keep ``data`` (not a copy: it must not change afterwards) as the next piece."""
        if len(data) == 0:
            return
        if len(data) < HOLD_MIN:
            data = memoryview(bytearray(data))
        self._starts.append(self.nbytes)
        self._pieces.append(data)
        self.nbytes += len(data)

    def pieces(self) -> list[memoryview]:
        return list(self._pieces)

    def ranges(self, offset: int, length: int) -> list[memoryview]:
        """Views of bytes ``[offset, offset+length)``, in order (one per piece it spans)."""
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise ValueError(f"range {offset}+{length} outside {self.nbytes} bytes")
        out: list[memoryview] = []
        i = bisect.bisect_right(self._starts, offset) - 1
        end = offset + length
        while offset < end:
            piece, lo = self._pieces[i], offset - self._starts[i]
            take = min(len(piece) - lo, end - offset)
            out.append(piece[lo : lo + take])
            offset += take
            i += 1
        return out

    def release(self) -> None:
        """Let the buffers go (views still lent out, e.g. a send in flight, keep theirs)."""
        self._pieces.clear()
        self._starts.clear()
        self.nbytes = 0
