"""The agent records its workers' captures (begin -> commit) as supervise.snapshot.capture
spans: they survive the worker, carry the node's rank and the worker's, and only local
captures count (shards ingested from peers or disk were not captured here)."""

from __future__ import annotations

import time

from supervise._testing import OtelCollector
from supervise.agents._capture_spans import CaptureSpans
from supervise.snapshot import protocol as p
from supervise.snapshot.manifest import Manifest
from supervise.snapshot.retention import VersionInfo
from supervise.snapshot.service import CommitEvent
from supervise.telemetry import setup_telemetry, shutdown_telemetry


def _commit(rank: int, step: int, source: str, wall_time: float) -> CommitEvent:
    m = Manifest(
        step=step, generation=2, rank=rank, world_size=4, nbytes=4096, tensors=(),
        wall_time=wall_time,
    )  # fmt: skip
    return CommitEvent(rank, VersionInfo(step, 2, wall_time, 4096, {}, source), m)


def test_captures_are_spans_from_begin_to_commit(otel_env: OtelCollector) -> None:
    setup_telemetry(rank=1)
    spans = CaptureSpans(node_rank=1)
    before = time.time_ns()
    spans.on_request(p.Begin(rank=3))
    spans.on_commit(_commit(3, 10, "local", wall_time=time.time()))
    spans.on_request(p.Begin(rank=2))
    spans.on_commit(_commit(2, 10, "peer", wall_time=time.time()))  # an ingest: not a capture
    spans.on_request(p.Abort(rank=2, arena="a", slot=0))
    earlier = time.time() - 60.0  # begun before this agent ran: the manifest's wall time
    spans.on_commit(_commit(2, 15, "local", wall_time=earlier))
    assert shutdown_telemetry(timeout_s=30)

    got = otel_env.wait_for_spans(["supervise.snapshot.capture"] * 2)
    assert len(otel_env.spans("supervise.snapshot.capture")) == 2
    by_rank = {s.attributes["supervise.rank"]: s for s in got}
    assert set(by_rank) == {2, 3}
    for rank, step in ((3, 10), (2, 15)):
        s = by_rank[rank]
        assert s.is_root
        assert s.attributes["supervise.node.rank"] == 1
        assert s.attributes["supervise.snapshot.step"] == step
        assert s.attributes["supervise.snapshot.version"] == step
        assert s.attributes["supervise.generation"] == 2
        assert s.attributes["supervise.bytes"] == 4096
    assert by_rank[3].start_unix_nano >= before
    assert by_rank[3].end_unix_nano >= by_rank[3].start_unix_nano
    assert by_rank[2].start_unix_nano == int(earlier * 1e9)

    def captures_timed(sink: object) -> bool:
        return any(
            pt.attributes.get("supervise.snapshot.operation") == "capture" and pt.count == 2
            for m in otel_env.metrics("supervise.snapshot.duration")
            for pt in m.points
        )

    otel_env.sink.wait_for(captures_timed)
