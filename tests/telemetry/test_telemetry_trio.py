"""OpenTelemetry context under trio: each task has its own context (a copy of its spawner's at
spawn time), so spans neither get lost across task spawns nor leak between tasks, and
cancellation inside a phase ends the span cleanly."""

import logging

import pytest
import trio
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from supervise.telemetry import RECOVERY_SPAN, RecoveryTrace, snapshot_span


def _current_span_id() -> int:
    return trace.get_current_span().get_span_context().span_id


@pytest.fixture
def context_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records OpenTelemetry logs when a context token is detached in the wrong context."""
    caplog.set_level(logging.WARNING, logger="opentelemetry")
    return caplog.records


async def test_phases_opened_in_other_tasks_parent_to_the_root(make_node, context_errors) -> None:
    node = make_node()
    rt = RecoveryTrace.begin("worker_exit", rank=0, telemetry=node.telemetry)

    async def detect() -> None:
        with rt.phase("detect"):
            await trio.lowlevel.checkpoint()

    async def rest() -> None:
        with rt.phase("restore"):
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(detect)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rest)
    rt.end("completed")
    root = node.span(RECOVERY_SPAN)
    for name in ("supervise.recovery.detect", "supervise.recovery.restore"):
        assert node.span(name).parent.span_id == root.context.span_id
    assert context_errors == []


async def test_tasks_spawned_inside_a_phase_inherit_it(make_node, context_errors) -> None:
    node = make_node()
    rt = RecoveryTrace.begin("peer_lost", rank=0, telemetry=node.telemetry)
    seen: dict[str, int] = {}

    async def fetch_shard(peer: int) -> None:
        seen[f"before-{peer}"] = _current_span_id()
        await trio.lowlevel.checkpoint()
        with snapshot_span("replicate", telemetry=node.telemetry, peer_rank=peer):
            await trio.lowlevel.checkpoint()
        seen[f"after-{peer}"] = _current_span_id()

    with rt.phase("detect"):
        pass
    with rt.phase("fetch") as op:
        fetch_id = op.span.get_span_context().span_id
        async with trio.open_nursery() as nursery:
            for peer in (1, 2, 3):
                nursery.start_soon(fetch_shard, peer)
    rt.end("completed")

    assert set(seen.values()) == {fetch_id}
    replicates = [s for s in node.spans() if s.name == "supervise.snapshot.replicate"]
    assert len(replicates) == 3
    assert {s.parent.span_id for s in replicates} == {fetch_id}
    assert _current_span_id() == 0
    assert context_errors == []


async def test_sibling_tasks_do_not_see_each_others_spans(make_node, context_errors) -> None:
    """Two "nodes" as two tasks in one trio run, interleaving inside their phases."""
    root_node, peer_node = make_node(rank=0), make_node(rank=1)
    rt = RecoveryTrace.begin("peer_lost", rank=0, telemetry=root_node.telemetry)
    carrier = rt.inject()
    observed: dict[int, set[int]] = {0: set(), 1: set()}
    own: dict[int, set[int]] = {0: set(), 1: set()}

    async def node_task(rank: int, trace_: RecoveryTrace) -> None:
        for phase in ("restore", "resume"):
            with trace_.phase(phase) as op:
                own[rank].add(op.span.get_span_context().span_id)
                for _ in range(5):
                    await trio.lowlevel.checkpoint()  # let the other task run inside its own phase
                    observed[rank].add(_current_span_id())
            assert _current_span_id() == 0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node_task, 0, rt)
        nursery.start_soon(
            node_task,
            1,
            RecoveryTrace.join(carrier, rank=1, telemetry=peer_node.telemetry),
        )
    rt.end("completed")
    assert observed[0] == own[0] and observed[1] == own[1]
    assert not own[0] & own[1]
    trace_ids = {s.context.trace_id for s in root_node.spans() + peer_node.spans()}
    assert len(trace_ids) == 1
    assert context_errors == []


async def test_a_task_spawned_before_a_phase_does_not_see_it(make_node) -> None:
    node = make_node()
    rt = RecoveryTrace.begin("nan", rank=0, telemetry=node.telemetry)
    go = trio.Event()
    seen: list[int] = []

    async def watcher() -> None:
        await go.wait()
        seen.append(_current_span_id())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        with rt.phase("detect"):
            go.set()
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
    rt.end("completed")
    assert seen == [0]


async def test_cancellation_inside_a_phase_ends_it_and_restores_context(
    make_node, context_errors, autojump_clock
) -> None:
    node = make_node()
    rt = RecoveryTrace.begin("heartbeat_timeout", rank=0, telemetry=node.telemetry)
    with rt.phase("detect"):
        pass
    with trio.move_on_after(5) as scope:
        with rt.phase("fetch", snapshot_source="peer"):
            await trio.sleep(3600)  # a peer that never answers; virtual time
    assert scope.cancelled_caught
    assert _current_span_id() == 0
    with rt.phase("restore", snapshot_source="disk"):
        pass
    rt.end("completed")
    fetch = node.span("supervise.recovery.fetch")
    assert fetch.end_time is not None
    assert fetch.status.status_code is StatusCode.ERROR
    assert fetch.status.description == "Cancelled"
    assert node.span("supervise.recovery.restore").status.status_code is StatusCode.UNSET
    assert context_errors == []
