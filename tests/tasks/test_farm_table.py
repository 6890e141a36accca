"""The farm's task table, pure: records survive their encoding, fences only grow, refused
moves are one-line errors, a merge keeps each task's newest revision; and the coordinator's
side of a moved task's `supervise.recovery` trace (detect, select_checkpoint, context in the
assignment)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import supervise.telemetry.lifecycle as telemetry_setup
from supervise.tasks.farm_messages import AttemptPhase, ControlAction, Submit, Update
from supervise.tasks.resources import Resources
from supervise.tasks.spec import TaskSpec
from supervise.tasks.states import Reason, TaskState
from supervise.tasks.table import TableError, TaskRecord, TaskTable, UnknownTask, UpdateVerdict
from supervise.telemetry import Telemetry, TelemetryConfig
from tests.tasks.farmkit import Farmlet, count_decodes

TARGET = "tests.tasks.taskfuncs:ticks"


def _table(*ids: str) -> TaskTable:
    t = TaskTable()
    for tid in ids:
        t.submit(TaskSpec(TARGET, (1,), task_id=tid), Resources(1.0), 1.0)
    return t


def test_a_record_survives_its_encoding() -> None:
    t = _table("a")
    rec = t.place("a", 2, 2.0)
    t.update(Update(2, "a", 1, rec.fence, AttemptPhase.STARTED, replicas=[2, 0]), 3.0)
    back = TaskRecord.from_bytes(rec.to_bytes())
    assert back.to_bytes() == rec.to_bytes()
    assert back.state is TaskState.RUNNING and back.replicas == {0, 2} and back.node == 2
    with pytest.raises(TableError, match="bad task record"):
        TaskRecord.from_bytes(b"\x81\xa1x\x01")


def test_a_replica_keeps_updates_encoded_until_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer decodes no record per table update: only the newest copy of each task, once,
    when the table is read (a take-over, a pull); an older copy arriving late is ignored."""
    leader, replica = _table("a", "b"), TaskTable()
    updates = [[r.to_bytes() for r in leader]]
    old_a = leader.get("a").to_bytes()
    rec = leader.place("a", 1, 2.0)
    updates.append([rec.to_bytes()])
    leader.update(Update(1, "a", 1, rec.fence, AttemptPhase.STARTED), 3.0)
    updates.append([leader.get("a").to_bytes()])
    decoded = count_decodes(monkeypatch)
    for update in updates:
        replica.merge_encoded(update)
    assert replica.merge_encoded([old_a]) == 0  # late and older: not taken
    assert decoded == []  # nothing decoded per update
    assert len(replica) == 2 and replica.get("a").state is TaskState.RUNNING
    assert len(decoded) == 2  # each task's newest copy, once
    assert replica.counts()[TaskState.RUNNING] == 1 and replica.counts()[TaskState.PENDING] == 1
    assert [r.to_bytes() for r in replica] == [r.to_bytes() for r in leader]
    assert replica.merge_encoded([old_a]) == 0  # older than the decoded copy: not taken
    assert replica.get("a").state is TaskState.RUNNING
    with pytest.raises(TableError, match="bad task record"):
        replica.merge_encoded([b"\x81\xa1x\x01"])
    with pytest.raises(TableError, match="bad task record"):
        replica.merge_encoded([b"\xc1"])


def test_a_replica_taking_over_gets_the_whole_table_from_encoded_updates() -> None:
    """Records kept encoded are the table a new coordinator works on: it places, moves and
    re-saves them as if decoded on arrival (nothing committed dropped)."""
    leader, replica = _table("a", "b", "c"), TaskTable()
    replica.merge_encoded(r.to_bytes() for r in leader)
    rec = leader.place("b", 0, 2.0)
    replica.merge_encoded([rec.to_bytes()])
    assert sorted(r.task_id for r in replica.requests(3.0)) == ["a", "c"]
    assert [r.task_id for r in replica.on_node(0)] == ["b"]
    moved = replica.node_lost(0, 4.0)
    assert [m.task_id for m in moved] == ["b"] and replica.get("b").state is TaskState.PENDING
    new, fresh = replica.submit(TaskSpec(TARGET, (1,), task_id="d"), Resources(1.0), 5.0)
    assert fresh and new.seq == 4  # after every sequence it took, decoded or not
    assert {r.task_id for r in replica.dirty} == {"b", "d"}


def test_fences_only_grow_and_old_ones_are_stale() -> None:
    t = _table("a")
    first = t.place("a", 0, 1.0).fence
    assert t.lost("a", 2.0, "node 0 lost") is not None
    second = t.place("a", 1, 3.0).fence
    assert second > first
    old = Update(0, "a", 1, first, AttemptPhase.COMPLETED, result=b"")
    assert t.update(old, 4.0) is UpdateVerdict.STALE
    wrong_node = Update(0, "a", 2, second, AttemptPhase.COMPLETED, result=b"")
    assert t.update(wrong_node, 4.0) is UpdateVerdict.STALE
    with pytest.raises(TableError, match="not above"):
        t.place("a", 1, 5.0, lambda f: f)


def test_refused_moves_are_one_line() -> None:
    t = _table("a")
    with pytest.raises(TableError, match="task 'a' is pending: cannot resume"):
        t.control("a", ControlAction.RESUME, 1.0)
    t.control("a", ControlAction.CANCEL, 1.0)
    with pytest.raises(TableError, match="is cancelled: cannot cancel"):
        t.control("a", ControlAction.CANCEL, 2.0)
    with pytest.raises(UnknownTask, match="no task 'b'"):
        t.control("b", ControlAction.PAUSE, 2.0)
    with pytest.raises(TableError, match="exists"):
        t.submit(TaskSpec("tests.tasks.taskfuncs:two_steps", (1,), task_id="a"), Resources(), 3.0)


def test_a_merge_keeps_the_newest_revision() -> None:
    leader, replica = _table("a", "b"), TaskTable()
    replica.merge(TaskRecord.from_bytes(r.to_bytes()) for r in leader)
    leader.place("a", 1, 2.0)
    stale = [TaskRecord.from_bytes(r.to_bytes()) for r in replica]
    replica.merge(TaskRecord.from_bytes(r.to_bytes()) for r in leader)
    replica.merge(stale)  # an older copy arriving late changes nothing
    assert replica.get("a").state is TaskState.ASSIGNED and replica.get("a").node == 1
    assert replica.counts()[TaskState.PENDING] == 1
    assert [r.task_id for r in replica.requests(10.0)] == ["b"]


def test_losses_count_apart_from_errors() -> None:
    t = _table("a")
    for i in range(3):
        t.place("a", 0, float(i))
        t.lost("a", float(i), "lost")
    rec = t.get("a")
    assert rec.losses == 3 and rec.errors == 0 and rec.life.count(Reason.NODE_LOST) == 3


async def test_a_moved_task_is_one_recovery_trace_with_its_context_in_the_assignment(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    tel = Telemetry.create(
        TelemetryConfig(), rank=0, span_processors=[SimpleSpanProcessor(exporter)]
    )
    monkeypatch.setattr(telemetry_setup._process, "current", tel)
    try:
        f = Farmlet(3, cpu=1.0)
        async with trio.open_nursery() as nursery:
            await f.start(nursery)
            await f.offer(0, cpu=0.0)  # the task runs on another node than the coordinator's
            spec = TaskSpec(TARGET, (1,), task_id="m")
            await f.client().request(0, Submit(spec.to_bytes(), Resources(1.0).to_json()))
            await trio.sleep(1.0)
            [(r, a)] = [(r, a) for r, n in enumerate(f.nodes) for a, _ in n.assigned]
            f.kill(r)
            await trio.sleep(1.0)
            [(r2, a2, trace)] = [
                (q, b, tr)
                for q, n in enumerate(f.nodes)
                for b, tr in n.assigned
                if b.task_id == "m" and b.fence > a.fence
            ]
            assert "traceparent" in trace
            up = Update(r2, "m", a2.attempt, a2.fence, AttemptPhase.STARTED)
            await f.links[r2].request(0, up)
            nursery.cancel_scope.cancel()
        spans = {s.name: s for s in exporter.get_finished_spans()}
        root = spans["supervise.recovery"]
        detect = spans["supervise.recovery.detect"]
        select = spans["supervise.recovery.select_checkpoint"]
        assert detect.context.trace_id == select.context.trace_id == root.context.trace_id
        assert root.attributes is not None and root.attributes["supervise.task.id"] == "m"
        assert root.attributes["supervise.recovery.outcome"] == "completed"
        assert trace["traceparent"].split("-")[1] == f"{root.context.trace_id:032x}"
    finally:
        tel.shutdown()


def test_unsaved_changes_give_way_to_the_saved_versions() -> None:
    t = _table("a", "b")
    saved = [TaskRecord.from_bytes(r.to_bytes()) for r in t]
    t.flushed({r.task_id: r.rev for r in t})
    t.place("a", 1, 2.0)  # changed, never saved
    t.submit(TaskSpec(TARGET, (1,), task_id="c"), Resources(1.0), 2.0)  # never saved
    t.drop_unsaved(saved)
    assert t.get("a").state is TaskState.PENDING and t.get("a").fence == 0
    assert "c" not in t and len(t) == 2 and t.counts()[TaskState.PENDING] == 2
