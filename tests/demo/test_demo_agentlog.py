"""Reading a node agent's JSON log lines into what the demo needs to know."""

from __future__ import annotations

import json

from supervise._demo.agentlog import NodeLog


def line(event: str, **fields: object) -> str:
    return json.dumps({**fields, "event": event, "timestamp": "2026-01-02T03:04:05.500000Z"})


def progress(rank: int, gen: int, step: int) -> str:
    text = json.dumps({"event": "step", "rank": rank, "step": step, "first": False, "loss": 1.0})
    return line("process_output", child=f"worker rank {rank} gen {gen}", line=text)


def test_generations_pids_progress_and_resume() -> None:
    log = NodeLog(1)
    log.feed(line("workers started", generation=1, step=-1, pids={"1": 4242}, master_port=1))
    assert log.generation is not None and log.generation.pids == {1: 4242}
    assert log.generation.resumed_at is None
    log.feed(progress(1, 1, 0))
    log.feed(line("training resumed", generation=1, step=-1))
    log.feed(progress(1, 1, 7))
    log.feed(progress(1, 1, 3))  # out of order: the newest step stays
    gen = log.generation
    assert gen.number == 1 and gen.step == -1 and gen.last_step == 7
    assert gen.resumed_at == 1767323045.5
    log.feed(line("workers started", generation=2, step=5, pids={"1": 4300}))
    log.feed(progress(1, 1, 9))  # a late line of the old generation does not count for the new
    assert log.generation.number == 2 and log.generation.last_step is None
    assert log.generations[1].last_step == 9


def test_finish_give_up_peer_loss_and_notes() -> None:
    log = NodeLog(0)
    log.feed(line("peer_lost", node=0, rank=2, silence=2.0))
    log.feed(line("recovery", trigger="peer_lost", evidence={"peer": 2}))
    log.feed(line("shard fetched from a peer", rank=2, step=25, holder=0))
    log.feed(line("giving up", reason="recovery exhausted", exit_code=3))
    log.feed(line("training finished on this node", node=0, generation=3))
    assert [peer for _, peer in log.peers_lost] == [2]
    assert log.gave_up == "recovery exhausted"
    assert log.finished_at is not None
    texts = [n.text for n in log.notes]
    assert "coordinator (node 0): recovery, trigger peer_lost" in texts
    assert "node 0: fetched rank 2's shard of step 25 from node 0" in texts


def test_garbage_is_counted_not_fatal() -> None:
    log = NodeLog(0)
    for text in ["", "not json", "[1, 2]", json.dumps({"event": 5})]:
        log.feed(text)
    log.feed(line("workers started", generation="x", pids="nope"))
    log.feed(line("process_output", child="worker rank 0 gen 1", line="{broken"))
    assert log.lines == 6
    assert log.malformed == 3
    assert log.generations == {}
