"""Hot standby agents (``supervise node --standby H:P``) with real processes: a lost node's
rank is taken over by a waiting standby, no replacement agent started; training finishes
bit for bit as a failure-free run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nodekit import FAST_POLICY, nodes
from test_node_recovery import LONG, assert_exact

from supervise.cluster import generate_keys

pytestmark = pytest.mark.slow


def test_a_standby_takes_over_a_killed_node_and_training_finishes_exactly(
    tmp_path: Path,
) -> None:
    """...and when the standby (now node 1) is lost in turn, a replacement agent at node 1's
    own address takes the rank back: its heartbeats say where it listens."""
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
        c.wait("node 1's shard replicated again", lambda: len(c.events(0, "replica stored")) >= 4)
        standby.proc.send_signal(signal.SIGKILL)
        c.start(1)  # at node 1's address, where node 0 no longer sends
        c.wait_resumed(3)
        assert c.events(0, "peer serves at a new endpoint")
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


def test_with_curve_keys_the_standby_takes_over_with_the_lost_node_s_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, 2, clients=("client", "standby"))
    policy = FAST_POLICY + f'[replication]\ncurve = true\ncurve_keys = "{keys}"\n'
    with nodes(tmp_path, 2, policy=policy, steps=LONG) as c:
        c.start_all()
        standby = c.start_standby()
        c.wait_resumed(1)
        c.wait("the standby waiting", lambda: standby.events("standby waiting"))
        c.wait("node 1's shard replicated", lambda: len(c.events(0, "replica stored")) >= 2)
        c.agents[1].proc.send_signal(signal.SIGKILL)
        assert c.wait_took_over(standby) == 1
        c.wait_resumed(2)
        assert c.events(1, "shard fetched from a peer")
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)
        # no key was refused on the way: the standby spoke as node 1, with node 1's key
        refusals = ("claims rank", "public key not in", "unknown public key")
        assert not [x for _, x in c.all_events() if any(r in str(x) for r in refusals)]


def test_with_curve_keys_a_standby_without_a_node_key_pair_refuses_to_start(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, 2, clients=("client", "standby"))
    for secret in keys.glob("node-*.key_secret"):
        secret.unlink()
    policy = tmp_path / "policy.toml"
    policy.write_text(FAST_POLICY + f'[replication]\ncurve = true\ncurve_keys = "{keys}"\n')
    argv = [
        sys.executable, "-m", "supervise", "node",
        "--standby", "127.0.0.1:7999",
        "--nodes", "127.0.0.1:7998,127.0.0.1:7997",
        "--policy", str(policy),
        "--shm-dir", str(tmp_path),
        "--", sys.executable, "-c", "pass",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "node-R.key_secret" in done.stderr


def test_a_lost_coordinator_is_taken_over_and_the_survivor_assigns_it(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, steps=LONG) as c:
        c.start_all()
        standby = c.start_standby()
        c.wait_resumed(1)
        c.wait("the standby waiting", lambda: standby.events("standby waiting"))
        c.wait("node 0's shard replicated", lambda: len(c.events(1, "replica stored")) >= 2)
        c.agents[0].proc.send_signal(signal.SIGKILL)  # node 0: the coordinator
        assert c.wait_took_over(standby) == 0
        c.wait_resumed(2)
        assert c.events(1, "a standby takes over a lost node"), "node 1 did not assign it"
        assert c.events(0, "shard fetched from a peer")
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)
        assert c.orphans() == []


@pytest.mark.parametrize(
    "flags", [[], ["--rank", "0", "--standby", "127.0.0.1:7999"]], ids=["neither", "both"]
)
def test_a_node_is_given_either_a_rank_or_a_standby_address(
    tmp_path: Path, flags: list[str]
) -> None:
    argv = [
        sys.executable, "-m", "supervise", "node", *flags,
        "--nodes", "127.0.0.1:7998,127.0.0.1:7997",
        "--shm-dir", str(tmp_path),
        "--", sys.executable, "-c", "pass",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "either --rank R (a node) or --standby H:P" in done.stderr
