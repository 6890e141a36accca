"""RecoveryTrace: the contract span tree, events and attributes; one trace across nodes;
order and input checks; outcomes; metrics; snapshot operation spans."""

import itertools
import re

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from supervise.telemetry import (
    RECOVERY_SPAN,
    Attr,
    Metric,
    Outcome,
    Phase,
    RecoveryEvent,
    RecoveryTrace,
    SnapshotOp,
    Telemetry,
    TelemetryError,
    Trigger,
    attributes,
    extract,
    inject,
    snapshot_span,
)


def _hex(span_id: int) -> str:
    return format(span_id, "016x")


def test_contract_names() -> None:
    assert RECOVERY_SPAN == "supervise.recovery"
    assert [p.span_name for p in Phase] == [
        "supervise.recovery.detect",
        "supervise.recovery.select_checkpoint",
        "supervise.recovery.fetch",
        "supervise.recovery.restore",
        "supervise.recovery.resume",
    ]
    assert [o.span_name for o in SnapshotOp] == [
        "supervise.snapshot.capture",
        "supervise.snapshot.replicate",
        "supervise.snapshot.persist",
    ]
    assert [e.value for e in RecoveryEvent] == [
        "detected",
        "started",
        "checkpoint_selected",
        "restored",
        "completed",
        "failed",
        "exhausted",
    ]
    assert {t.value for t in Trigger} == {
        "worker_exit",
        "heartbeat_timeout",
        "peer_lost",
        "nan",
        "checksum",
        "manual",
    }
    assert (
        Attr.TRIGGER,
        Attr.NODE_RANK,
        Attr.ATTEMPT,
        Attr.SNAPSHOT_VERSION,
        Attr.SNAPSHOT_STEP,
        Attr.SNAPSHOT_SOURCE,
        Attr.BYTES,
    ) == (
        "supervise.trigger",
        "supervise.node.rank",
        "supervise.attempt",
        "supervise.snapshot.version",
        "supervise.snapshot.step",
        "supervise.snapshot.source",
        "supervise.bytes",
    )


def _full_recovery(tel: Telemetry) -> RecoveryTrace:
    rt = RecoveryTrace.begin(Trigger.WORKER_EXIT, rank=0, telemetry=tel)
    with rt.phase("detect"):
        pass
    rt.event("detected", peer_rank=1)
    rt.event(RecoveryEvent.STARTED)
    with rt.phase("select_checkpoint"):
        pass
    rt.set(snapshot_version=40, snapshot_step=40)
    rt.event("checkpoint_selected", snapshot_version=40, snapshot_step=40)
    with rt.phase(Phase.FETCH, snapshot_source="peer") as op:
        op.set(bytes=1 << 20)
    with rt.phase("restore", snapshot_source="peer", bytes=1 << 20):
        pass
    rt.event("restored")
    with rt.phase("resume"):
        pass
    rt.end("completed")
    return rt


def test_one_node_recovery_is_the_contract_tree(make_node) -> None:
    node = make_node(rank=0)
    rt = _full_recovery(node.telemetry)
    root = node.span(RECOVERY_SPAN)
    assert root.parent is None
    assert root.kind is SpanKind.INTERNAL
    assert root.status.status_code is StatusCode.OK
    assert rt.outcome is Outcome.COMPLETED
    assert rt.trace_id == format(root.context.trace_id, "032x")
    assert [e.name for e in root.events] == [
        "detected",
        "started",
        "checkpoint_selected",
        "restored",
        "completed",
    ]
    assert root.events[0].attributes == {Attr.PEER_RANK: 1}
    assert root.events[2].attributes == {Attr.SNAPSHOT_VERSION: 40, Attr.SNAPSHOT_STEP: 40}
    assert root.attributes[Attr.TRIGGER] == "worker_exit"
    assert root.attributes[Attr.NODE_RANK] == 0
    assert root.attributes[Attr.ATTEMPT] == 1
    assert root.attributes[Attr.SNAPSHOT_VERSION] == 40
    assert root.attributes[Attr.OUTCOME] == "completed"

    phases = [s for s in node.spans() if s.name != RECOVERY_SPAN]
    assert [s.name for s in phases] == [p.span_name for p in Phase]
    for span in phases:
        assert span.parent is not None
        assert span.parent.span_id == root.context.span_id
        assert span.context.trace_id == root.context.trace_id
        assert span.attributes[Attr.NODE_RANK] == 0
        assert span.attributes[Attr.ATTEMPT] == 1
        assert span.attributes[Attr.TRIGGER] == "worker_exit"
    # in order, without overlap, inside the root
    for earlier, later in itertools.pairwise(phases):
        assert earlier.end_time <= later.start_time
    assert root.start_time <= phases[0].start_time
    assert phases[-1].end_time <= root.end_time
    fetch = node.span("supervise.recovery.fetch")
    assert fetch.attributes[Attr.SNAPSHOT_SOURCE] == "peer"
    assert fetch.attributes[Attr.BYTES] == 1 << 20


def test_recovery_metrics(make_node) -> None:
    node = make_node(rank=0)
    _full_recovery(node.telemetry)
    phase_points = node.metric_points(Metric.PHASE_DURATION.name)
    by_phase = {p.attributes[Attr.PHASE]: p for p in phase_points}
    assert set(by_phase) == {p.value for p in Phase}
    assert all(p.count == 1 for p in phase_points)
    assert by_phase["fetch"].attributes[Attr.SNAPSHOT_SOURCE] == "peer"
    (duration,) = node.metric_points(Metric.RECOVERY_DURATION.name)
    assert duration.attributes == {Attr.OUTCOME: "completed", Attr.TRIGGER: "worker_exit"}
    assert duration.sum >= max(p.sum for p in phase_points)
    (count,) = node.metric_points(Metric.RECOVERIES.name)
    assert count.value == 1
    io = {
        p.attributes[Attr.OPERATION]: p.value for p in node.metric_points(Metric.SNAPSHOT_IO.name)
    }
    assert io == {"fetch": 1 << 20, "restore": 1 << 20}
    throughput = node.metric_points(Metric.SNAPSHOT_THROUGHPUT.name)
    assert {p.attributes[Attr.OPERATION] for p in throughput} == {"fetch", "restore"}


def test_two_nodes_share_one_trace_via_inject_extract(make_node) -> None:
    root_node = make_node(rank=0)
    peer_node = make_node(rank=1)
    rt = RecoveryTrace.begin("peer_lost", rank=0, telemetry=root_node.telemetry)
    with rt.phase("detect"):
        pass
    carrier = rt.inject()
    assert set(carrier) == {"traceparent"}
    assert carrier["traceparent"].startswith("00-" + rt.trace_id)

    joined = RecoveryTrace.join(carrier, rank=1, trigger="peer_lost", telemetry=peer_node.telemetry)
    assert not joined.is_root
    assert joined.trace_id == rt.trace_id
    assert joined.inject() == carrier  # re-propagates the same root
    with joined.phase("fetch", snapshot_source="disk", bytes=10) as op:
        joined.event("shard_received", peer_rank=2)
        op.set(snapshot_version=7)
    with joined.phase("restore"):
        pass
    with joined.phase("resume"):
        pass
    rt.end("completed")

    root = root_node.span(RECOVERY_SPAN)
    remote = peer_node.spans()
    assert [s.name for s in remote] == [
        "supervise.recovery.fetch",
        "supervise.recovery.restore",
        "supervise.recovery.resume",
    ]
    for span in remote:
        assert span.context.trace_id == root.context.trace_id
        assert span.parent is not None and span.parent.is_remote
        assert span.parent.span_id == root.context.span_id
        assert span.attributes[Attr.NODE_RANK] == 1
        assert span.resource.attributes[Attr.NODE_RANK] == 1
        assert span.attributes[Attr.TRIGGER] == "peer_lost"
    fetch = peer_node.span("supervise.recovery.fetch")
    assert [e.name for e in fetch.events] == ["shard_received"]
    assert fetch.attributes[Attr.SNAPSHOT_VERSION] == 7
    assert root.resource.attributes[Attr.NODE_RANK] == 0


def test_phase_order_is_enforced_per_attempt(make_node) -> None:
    node = make_node()
    rt = RecoveryTrace.begin("nan", rank=0, telemetry=node.telemetry)
    with rt.phase("detect"):
        pass
    with rt.phase("restore"):  # select_checkpoint and fetch may be skipped
        pass
    with pytest.raises(TelemetryError, match="'select_checkpoint' out of order: 'restore'"):
        with rt.phase("select_checkpoint"):
            pass
    with pytest.raises(TelemetryError, match="'restore' out of order"):
        with rt.phase("restore"):
            pass
    with rt.phase("resume"):
        with pytest.raises(TelemetryError, match="while 'resume' is still open"):
            with rt.phase("resume"):
                pass
    assert rt.next_attempt() == 2
    with pytest.raises(TelemetryError, match="'detect' out of order"):
        with rt.phase("detect"):
            pass
    with rt.phase("select_checkpoint"):
        pass
    with rt.phase("restore"):
        pass
    rt.end("completed")
    restores = [s for s in node.spans() if s.name == "supervise.recovery.restore"]
    assert [s.attributes[Attr.ATTEMPT] for s in restores] == [1, 2]
    assert node.span(RECOVERY_SPAN).attributes[Attr.ATTEMPT] == 2
    assert node.span(RECOVERY_SPAN).events[-1].attributes[Attr.ATTEMPT] == 2
    with pytest.raises(TelemetryError, match="after the recovery ended"):
        with rt.phase("resume"):
            pass


def test_unknown_phase_outcome_and_attributes_are_errors(make_node) -> None:
    node = make_node()
    rt = RecoveryTrace.begin("checksum", rank=0, telemetry=node.telemetry)
    with pytest.raises(TelemetryError, match="recovery phase 'warmup': must be one of detect"):
        rt.phase("warmup")
    with pytest.raises(TelemetryError, match=re.escape("supervise.snapshot.source = 'ram'")):
        with rt.phase("fetch", snapshot_source="ram"):
            pass
    with pytest.raises(TelemetryError, match="unknown attribute 'snapshot'"):
        rt.event("detected", snapshot=3)
    with pytest.raises(
        TelemetryError, match=re.escape("supervise.bytes = -1: must be an integer >= 0")
    ):
        rt.set(bytes=-1)
    with pytest.raises(
        TelemetryError, match=re.escape("supervise.attempt = 0: must be an integer >= 1")
    ):
        rt.set(attempt=0)
    with pytest.raises(TelemetryError, match="call end\\('failed'\\) instead"):
        rt.event("failed")
    with pytest.raises(TelemetryError, match="recovery outcome 'done'"):
        rt.end("done")
    with pytest.raises(TelemetryError, match=re.escape("supervise.trigger = 'oom'")):
        RecoveryTrace.begin("oom", rank=0, telemetry=node.telemetry)
    with pytest.raises(TelemetryError, match=re.escape("supervise.node.rank = -2")):
        RecoveryTrace.begin("manual", rank=-2, telemetry=node.telemetry)
    rt.end("exhausted", reason="3 attempts failed")
    with pytest.raises(TelemetryError, match="already ended"):
        rt.end("completed")
    with pytest.raises(TelemetryError, match="after the recovery ended"):
        rt.event("detected")
    root = node.span(RECOVERY_SPAN)
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == "recovery exhausted: 3 attempts failed"
    assert root.events[-1].name == "exhausted"


def test_attribute_helper_values() -> None:
    assert attributes({"custom.key": (1, 2)}, snapshot_source="local", generation=3) == {
        "custom.key": (1, 2),
        Attr.SNAPSHOT_SOURCE: "local",
        Attr.GENERATION: 3,
    }
    with pytest.raises(TelemetryError, match="custom = \\[1, 'a'\\]"):
        attributes({"custom": [1, "a"]})
    with pytest.raises(TelemetryError, match="custom = None"):
        attributes({"custom": None})  # type: ignore[dict-item]
    with pytest.raises(TelemetryError, match="attribute key ''"):
        attributes({"": 1})


def test_failed_phase_records_the_exception_and_the_block_fails_the_recovery(make_node) -> None:
    node = make_node()
    with pytest.raises(OSError, match="peer gone"):
        with RecoveryTrace.begin("peer_lost", rank=4, telemetry=node.telemetry) as rt:
            with rt.phase("detect"):
                pass
            with rt.phase("fetch", snapshot_source="peer"):
                raise OSError("peer gone")
    assert rt.outcome is Outcome.FAILED
    fetch = node.span("supervise.recovery.fetch")
    assert fetch.status.status_code is StatusCode.ERROR
    assert fetch.status.description == "OSError: peer gone"
    assert [e.name for e in fetch.events] == ["exception"]
    root = node.span(RECOVERY_SPAN)
    assert root.events[-1].name == "failed"
    assert root.events[-1].attributes["exception.type"] == "OSError"
    assert root.status.status_code is StatusCode.ERROR
    (point,) = [
        p
        for p in node.metric_points(Metric.PHASE_DURATION.name)
        if p.attributes[Attr.PHASE] == "fetch"
    ]
    assert point.attributes["error.type"] == "OSError"
    assert rt.next_attempt() == 2  # allowed; the trace is ended, so phases are not
    with pytest.raises(TelemetryError, match="after the recovery ended"):
        with rt.phase("restore"):
            pass


def test_block_without_end_completes(make_node) -> None:
    node = make_node()
    with RecoveryTrace.begin("manual", rank=0, telemetry=node.telemetry) as rt:
        with rt.phase("select_checkpoint"):
            pass
    assert rt.outcome is Outcome.COMPLETED
    assert node.span(RECOVERY_SPAN).events[-1].name == "completed"


def test_joined_trace_restrictions(make_node) -> None:
    node = make_node(rank=1)
    joined = RecoveryTrace.join({}, rank=1, telemetry=node.telemetry)
    with pytest.raises(TelemetryError, match="only the node that began the recovery ends it"):
        joined.end("completed")
    with pytest.raises(TelemetryError, match="only the node that began the recovery holds"):
        joined.set(snapshot_version=1)
    with pytest.raises(TelemetryError, match="none is open"):
        joined.event("restored")
    with joined:
        with joined.phase("restore"):
            pass
    # no valid carrier: the phase still records, as the root of its own trace
    assert node.span("supervise.recovery.restore").parent is None


def test_malformed_carrier_is_ignored() -> None:
    assert not extract({"traceparent": "garbage"})
    assert not extract({"traceparent": 12})  # not a str
    assert not extract({})


def test_begin_with_a_parent_carrier_joins_the_caller(make_node) -> None:
    node = make_node()
    with node.telemetry.tracer.start_as_current_span("supervise recover --version 40") as cli:
        carrier = inject()
    rt = RecoveryTrace.begin("manual", rank=0, parent=carrier, telemetry=node.telemetry)
    rt.end("completed")
    root = node.span(RECOVERY_SPAN)
    assert root.parent is not None and root.parent.span_id == cli.get_span_context().span_id


def test_begin_starts_a_new_trace_even_inside_another_span(make_node) -> None:
    node = make_node()
    with node.telemetry.tracer.start_as_current_span("agent loop"):
        RecoveryTrace.begin("nan", rank=0, telemetry=node.telemetry).end("completed")
    assert node.span(RECOVERY_SPAN).parent is None


def test_disabled_node_still_propagates_a_remote_root(make_node) -> None:
    traced = make_node(rank=0)
    rt = RecoveryTrace.begin("worker_exit", rank=0, telemetry=traced.telemetry)
    off = Telemetry.disabled()
    joined = RecoveryTrace.join(rt.inject(), rank=1, telemetry=off)
    with joined.phase("restore") as op:
        op.set(bytes=5)
    assert joined.inject() == rt.inject()
    assert joined.trace_id == rt.trace_id


def test_snapshot_span_is_a_child_of_the_current_span_and_records_metrics(make_node) -> None:
    node = make_node()
    rt = RecoveryTrace.begin("worker_exit", rank=0, telemetry=node.telemetry)
    with rt.phase("detect"):
        pass
    with rt.phase("restore"):
        with snapshot_span(
            "persist", telemetry=node.telemetry, snapshot_version=3, bytes=2048
        ) as op:
            op.event("file_written")
    rt.end("completed")
    with snapshot_span(SnapshotOp.CAPTURE, telemetry=node.telemetry) as op:
        op.set(bytes=100, snapshot_step=12)
    persist = node.span("supervise.snapshot.persist")
    assert persist.parent.span_id == node.span("supervise.recovery.restore").context.span_id
    assert persist.attributes[Attr.SNAPSHOT_VERSION] == 3
    assert [e.name for e in persist.events] == ["file_written"]
    capture = node.span("supervise.snapshot.capture")
    assert capture.parent is None
    assert capture.attributes[Attr.SNAPSHOT_STEP] == 12
    durations = {
        p.attributes[Attr.OPERATION]: p.count
        for p in node.metric_points(Metric.SNAPSHOT_DURATION.name)
    }
    assert durations == {"persist": 1, "capture": 1}
    io = {
        p.attributes[Attr.OPERATION]: p.value for p in node.metric_points(Metric.SNAPSHOT_IO.name)
    }
    assert io == {"persist": 2048, "capture": 100}
    with pytest.raises(TelemetryError, match="snapshot operation 'copy'"):
        snapshot_span("copy", telemetry=node.telemetry)


def test_start_time_backdates_spans(make_node) -> None:
    node = make_node()
    rt = RecoveryTrace.begin(
        "heartbeat_timeout", rank=0, telemetry=node.telemetry, start_time_ns=1_000
    )
    with rt.phase("detect", start_time_ns=2_000):
        pass
    rt.end("completed")
    assert node.span(RECOVERY_SPAN).start_time == 1_000
    assert node.span("supervise.recovery.detect").start_time == 2_000
    # durations are measured from the given start (here: 1970), not from the call
    (duration,) = node.metric_points(Metric.RECOVERY_DURATION.name)
    assert duration.sum > 1e9
    detect = [
        p
        for p in node.metric_points(Metric.PHASE_DURATION.name)
        if p.attributes[Attr.PHASE] == "detect"
    ]
    assert detect[0].sum > 1e9


def test_failed_snapshot_operation_is_an_error_span(make_node) -> None:
    node = make_node()
    with pytest.raises(OSError, match="disk full"):
        with snapshot_span("persist", telemetry=node.telemetry, bytes=10):
            raise OSError(28, "disk full")
    span = node.span("supervise.snapshot.persist")
    assert span.status.status_code is StatusCode.ERROR
    assert "disk full" in span.status.description
    (point,) = node.metric_points(Metric.SNAPSHOT_DURATION.name)
    assert point.attributes == {Attr.OPERATION: "persist", "error.type": "OSError"}
