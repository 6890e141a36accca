"""The agent records its workers' captures: one ``supervise.snapshot.capture`` span per
committed version, from the worker's ``begin`` (it asked for a slot) to the commit.

The agent records them, not the worker: workers are stopped (SIGTERM) at every recovery and
killed by the very failures we trace, taking unexported spans with them; the agent outlives
them and flushes at exit, as it keeps the snapshot arena they write into.
"""

from __future__ import annotations

import time

from supervise.snapshot import protocol as p
from supervise.snapshot.service import CommitEvent
from supervise.telemetry import SnapshotOp, Source, snapshot_span, untraced


class CaptureSpans:
    """ArenaService hooks: ``on_request`` notes each begin, ``on_commit`` records the span."""

    def __init__(self, node_rank: int) -> None:
        self.node_rank = node_rank
        self._begun: dict[int, int] = {}  # rank -> time_ns its last begin arrived

    def on_request(self, req: p.Request) -> None:
        """Request hook: a begin starts a capture, an abort drops it."""
        if isinstance(req, p.Begin):
            self._begun[req.rank] = time.time_ns()
        elif isinstance(req, p.Abort):
            self._begun.pop(req.rank, None)

    def on_commit(self, event: CommitEvent) -> None:
        """Commit hook: a worker's capture committed (shards from peers or disk are not)."""
        if event.info.source != Source.LOCAL:
            return
        m = event.manifest
        started = self._begun.pop(event.rank, None)
        if started is None:  # begun before this agent process ran: the capture's wall time
            started = int(m.wall_time * 1e9)
        with (
            untraced(),  # a capture is its own trace, whatever the hook's task is part of
            snapshot_span(
                SnapshotOp.CAPTURE,
                start_time_ns=min(started, time.time_ns()),
                node_rank=self.node_rank,
                rank=event.rank,
                snapshot_step=m.step,
                snapshot_version=m.step,
                generation=m.generation,
                bytes=m.nbytes,
            ),
        ):
            pass
