"""A pyzmq socket driven by trio: non-blocking send/recv plus one waiter on the socket's FD.

libzmq signals its FD edge-triggered: the FD becomes readable when the socket's internal
command mailbox got something, and *any* call that processes commands (send, recv, reading
``EVENTS``) consumes that edge. So the rules are:

- always re-check ``EVENTS`` before waiting on the FD;
- only one task may wait on the FD at a time (trio raises ``BusyResourceError`` otherwise):
  the first task that must wait becomes the *FD waiter*; any other task parks and is woken
  whenever the waiter wakes, then re-checks for itself;
- after every call that touches the socket (a send or recv, successful or not, or an
  ``EVENTS`` check), wake the waiting tasks if the socket is now ready for what one of them
  waits for: the call may have consumed the edge that their waiter was waiting for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import trio
import zmq

Frames = Sequence[Any]  # bytes, memoryview, zmq.Frame or anything with the buffer protocol


class ZSocket:
    """A zmq socket used from trio tasks: any number of senders and receivers, never blocking
    the event loop, never two tasks waiting on the FD.
    """

    __slots__ = ("_closed", "_fd", "_lot", "_sock", "_waiter_scope", "_want")

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._fd: int = sock.FD
        self._lot = trio.lowlevel.ParkingLot()
        self._waiter_scope: trio.CancelScope | None = None
        self._want: dict[int, int] = {int(zmq.POLLIN): 0, int(zmq.POLLOUT): 0}  # waiting, by event
        self._closed = False

    @property
    def raw(self) -> zmq.Socket[Any]:
        """The underlying pyzmq socket (for options; never block on it)."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def _events(self) -> int:
        return cast(int, self._sock.get(zmq.EVENTS))

    def _kick(self) -> None:
        """Wake every task waiting for this socket so it re-checks ``EVENTS``."""
        if self._waiter_scope is not None:
            self._waiter_scope.cancel()
        if self._lot.statistics().tasks_waiting:
            self._lot.unpark_all()

    def _notify(self, events: int | None = None) -> None:
        """After a call that may have processed commands: wake waiters that can now proceed."""
        want = self._want
        if not (want[zmq.POLLIN] or want[zmq.POLLOUT]):
            return
        ev = self._events() if events is None else events
        if (ev & zmq.POLLIN and want[zmq.POLLIN]) or (ev & zmq.POLLOUT and want[zmq.POLLOUT]):
            self._kick()

    async def _wait(self, want: int) -> None:
        """Wait until ``EVENTS`` may have changed; return at once if ``want`` is already set."""
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        ev = self._events()
        self._notify(ev)
        if ev & want:
            return
        self._want[want] += 1
        try:
            if self._waiter_scope is not None:
                await self._lot.park()
                return
            with trio.CancelScope() as scope:
                self._waiter_scope = scope
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                finally:
                    self._waiter_scope = None
                    self._lot.unpark_all()
        finally:
            self._want[want] -= 1

    async def recv_multipart(self) -> list[zmq.Frame]:
        """Receive one multipart message, zero-copy (``zmq.Frame`` parts)."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("socket is closed")
            try:
                parts: list[zmq.Frame] = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._wait(zmq.POLLIN)
                continue
            self._notify()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return parts

    def try_recv_multipart(self) -> list[zmq.Frame] | None:
        """One multipart message if one is here now, else None (never waits)."""
        if self._closed:
            return None
        try:
            parts: list[zmq.Frame] | None = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            parts = None
        self._notify()
        return parts

    async def recv_first(self) -> zmq.Frame:
        """Receive the first part of the next message, zero-copy.

        The rest of the message is already here (zmq delivers multipart messages atomically):
        take it with :meth:`recv_part` / :meth:`recv_part_into` while ``frame.more``, without
        awaiting in between, then call :meth:`received` (and yield to trio soon after).
        """
        while True:
            if self._closed:
                raise trio.ClosedResourceError("socket is closed")
            try:
                frame: zmq.Frame = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                await self._wait(zmq.POLLIN)
                continue
            return frame

    def recv_part(self) -> zmq.Frame:
        """The next part of the message being received, zero-copy."""
        frame: zmq.Frame = self._sock.recv(zmq.NOBLOCK, copy=False)
        return frame

    def recv_part_into(self, buffer: memoryview) -> tuple[int, bool]:
        """Receive the next part of the message straight into ``buffer`` (one copy, out of
        libzmq's message, without the GIL); returns (the part's full size, more parts follow).
        A part larger than ``buffer`` is truncated: the caller must treat it as malformed.
        """
        n: int = self._sock.recv_into(buffer, flags=zmq.NOBLOCK)
        return n, bool(self._sock.get(zmq.RCVMORE))

    def skip_rest(self, more: bool) -> int:
        """Discard the remaining parts of the message being received; returns how many."""
        skipped = 0
        while more:
            more = self.recv_part().more
            skipped += 1
        return skipped

    def received(self) -> None:
        """Finish receiving one message part by part: wake the tasks it may concern (the
        receives may have consumed the FD's edge they wait for).
        """
        self._notify()

    def try_send_multipart(self, parts: Frames) -> bool:
        """Send now if the socket can take the message; False if it would block (HWM, or no
        connection yet with ``IMMEDIATE``). Zero-copy for large parts.
        """
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")
        try:
            self._sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        finally:
            self._notify()
        return True

    async def send_multipart(self, parts: Frames) -> None:
        """Send one multipart message, waiting (without blocking trio) while the socket is full."""
        while not self.try_send_multipart(parts):
            await self._wait(zmq.POLLOUT)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self, linger: int = 0) -> None:
        """Close the socket; tasks waiting on it get ``ClosedResourceError``."""
        if self._closed:
            return
        self._closed = True
        if self._waiter_scope is not None:
            trio.lowlevel.notify_closing(self._fd)
        self._lot.unpark_all()
        self._sock.close(linger=linger)
