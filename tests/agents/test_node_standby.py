"""Hot standby agents (``supervise node --standby H:P``) with real processes: a lost node's
rank is taken over by a waiting standby, no replacement agent started; training finishes
bit for bit as a failure-free run."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from nodekit import nodes
from test_node_recovery import LONG, assert_exact

pytestmark = pytest.mark.slow


def test_a_standby_takes_over_a_killed_node_and_training_finishes_exactly(
    tmp_path: Path,
) -> None:
    with nodes(tmp_path, 2, steps=LONG) as c:
        c.start_all()
        standby = c.start_standby()
        c.wait_resumed(1)
        c.wait("the standby waiting", lambda: standby.events("standby waiting"))
        c.wait(
            "node 1's shard replicated to node 0", lambda: len(c.events(0, "replica stored")) >= 2
        )
        worker = c.worker_pid(1)
        c.agents[1].proc.send_signal(signal.SIGKILL)  # kill -9 of node 1's agent; no replacement
        c.wait("the lost node's worker to die with it", lambda: worker not in c.orphans(), 20)
        assert c.wait_took_over(standby) == 1
        assert c.agents[1] is standby
        c.wait_resumed(2)
        assert c.events(1, "shard fetched from a peer"), "the standby did not fetch the shard"
        assert c.events(0, "a standby takes over a lost node")
        # the standby's spare, started while it waited, ran the worker (no cold start)
        started = [x for x in c.events(1, "workers started") if x.get("generation", 0) >= 2]
        assert started and started[0]["warm"] == [1], started
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)
        assert c.orphans() == []


def test_two_losses_with_two_standbys_are_both_covered_the_oldest_first(tmp_path: Path) -> None:
    with nodes(tmp_path, 3, steps=LONG) as c:
        c.start_all()
        first = c.start_standby()
        c.wait("the first standby waiting", lambda: first.events("standby waiting"))
        second = c.start_standby()
        c.wait_resumed(1)
        c.wait("the second standby waiting", lambda: second.events("standby waiting"))
        c.wait(
            "every shard replicated",
            lambda: all(len(c.events(r, "replica stored")) >= 2 for r in range(3)),
        )
        c.agents[2].proc.send_signal(signal.SIGKILL)
        assert c.wait_took_over(first) == 2  # the oldest standby takes the first loss
        c.wait_resumed(2)
        c.agents[1].proc.send_signal(signal.SIGKILL)
        assert c.wait_took_over(second) == 1
        c.wait_resumed(3)
        assert all(c.wait_exit(r) == 0 for r in range(3))
        assert_exact(c.out, 3, LONG)
        assert c.orphans() == []


def test_a_lost_standby_is_dropped_and_another_takes_the_rank(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, steps=LONG) as c:
        c.start_all()
        doomed = c.start_standby()
        c.wait("the first standby waiting", lambda: doomed.events("standby waiting"))
        spare = c.start_standby()
        c.wait_resumed(1)
        c.wait("the second standby waiting", lambda: spare.events("standby waiting"))
        c.kill_agent(doomed)  # the oldest standby is lost before it is needed
        c.wait("node 1's shard replicated", lambda: len(c.events(0, "replica stored")) >= 2)
        c.agents[1].proc.send_signal(signal.SIGKILL)
        assert c.wait_took_over(spare) == 1
        c.wait_resumed(2)
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)
