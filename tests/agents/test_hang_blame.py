"""A hang's evidence names the rank that stopped stepping, not a bystander blocked in a
collective waiting for it: real node agents whose fake workers step in lockstep over TCP (a
stopped rank blocks its peer's barrier, as with gloo), each rank in turn stopped by SIGSTOP.

Without a cross-node judgement the bystander's node (which sees only its own silent rank) may
time out first and be blamed; the coordinator must ask every node for its stalled ranks'
records and name the stopped one."""

from __future__ import annotations

from pathlib import Path

import pytest
from nodekit import nodes

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("victim", [0, 1])
def test_sigstopped_rank_is_named_not_the_rank_waiting_for_it(tmp_path: Path, victim: int) -> None:
    with nodes(tmp_path, 2, steps=100_000) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("a snapshot", lambda: len(c.events(1 - victim, "replica stored")) >= 1)
        c.hang_worker(victim)
        rec = c.wait(
            "the hang's recovery",
            lambda: next(iter(c.recoveries(0)), None),
        )
        evidence = rec["evidence"]
        assert rec["trigger"] == "heartbeat_timeout", rec
        assert (evidence["rank"], evidence["node"]) == (victim, victim), evidence
        assert (evidence["state"], evidence["blamed_by"]) == ("stopped", "process_state"), evidence
        stalled = {b["rank"]: b for b in evidence["stalled"]}
        assert stalled[victim]["state"] == "stopped", evidence
        # The coordinator's judgement is logged once, naming the stopped rank.
        hung = c.events(0, "worker hung")
        assert [(h["rank"], h["node"]) for h in hung] == [(victim, victim)], hung
        c.wait_resumed(2)
        c.stop()
        assert c.orphans() == []
