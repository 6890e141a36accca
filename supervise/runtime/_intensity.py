"""Restart intensity: OTP's MaxR restarts in MaxT seconds, past which a supervisor gives up."""

from __future__ import annotations

from collections import deque


class Intensity:
    """The restarts of one supervisor within its sliding window of ``max_seconds``."""

    __slots__ = ("_times", "max_restarts", "max_seconds")

    def __init__(self, max_restarts: int, max_seconds: float) -> None:
        self.max_restarts = max_restarts
        self.max_seconds = max_seconds
        self._times: deque[float] = deque()

    def add(self, now: float) -> bool:
        """Record a restart at ``now``; False once more than ``max_restarts`` fall within
        ``max_seconds`` (a restart exactly ``max_seconds`` ago still counts, as in OTP)."""
        times = self._times
        times.append(now)
        horizon = now - self.max_seconds
        while times[0] < horizon:
            times.popleft()
        return len(times) <= self.max_restarts

    @property
    def limit(self) -> str:
        """The limit in words, for `GaveUp`."""
        return f"more than {self.max_restarts} restarts within {self.max_seconds:g} s"
