"""Real node agents coordinated through a real etcd (``--store etcd://...``): the elected
leader coordinates, its decisions are in the store, and a worker crash recovers exactly as
with the embedded store."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from nodekit import free_ports, nodes
from test_node_recovery import LONG, assert_exact

from supervise._testing.etcd import EtcdCluster
from supervise.cli import main
from supervise.store import Record, open_store, parse_store_url


def read_job(url: str, job: str) -> dict[str, Record]:
    """Every key of ``job`` in the store, by its name under the job's prefix."""
    config = parse_store_url(url, job=job)

    async def read() -> dict[str, Record]:
        store = open_store(config)
        try:
            snap = await store.range(config.prefix, prefix=True)
        finally:
            await store.aclose()
        return {r.key.removeprefix(config.prefix): r for r in snap.records}

    return trio.run(read)


@pytest.mark.slow
def test_an_elected_coordinator_recovers_a_crash_is_succeeded_when_killed_and_outlives_etcd(
    tmp_path: Path, etcd_binary: Path
) -> None:
    steps = 2 * LONG  # one cluster for three scenarios: a crash, a killed leader, etcd down
    with (
        EtcdCluster(tmp_path / "etcd", binary=etcd_binary) as etcd,
        nodes(tmp_path, 2, steps=steps) as c,
    ):
        c.options = ["--store", etcd.url, "--job", "crash"]
        c.start(1)  # node 1 campaigns first: the coordinator is not the lowest rank now
        c.wait("node 1 elected", lambda: c.events(1, "elected coordinator"))
        c.start(0)
        c.wait_resumed(1)
        keys = read_job(etcd.url, "crash")
        assert {"members/0", "members/1", "leader", "attempt", "decision"} <= set(keys)
        assert keys["members/0"].lease and keys["members/1"].lease  # membership = live leases
        first = keys["leader"]
        assert first.value == b"1"
        start = json.loads(keys["decision"].value)
        assert (start["generation"], start["leader"]) == (1, 1)
        assert start["term"] == first.create_revision  # written fenced on its term

        # a worker crash: the elected coordinator (node 1) recovers, the follower does not
        c.wait("a few snapshots", lambda: len(c.events(1, "replica stored")) >= 2)
        c.fault("crash", 0)
        c.wait_resumed(2)
        rec = c.recoveries(1)[0]
        assert rec["trigger"] == "worker_exit" and rec["evidence"]["node"] == 0
        assert not c.recoveries(0)
        decision = json.loads(read_job(etcd.url, "crash")["decision"].value)
        assert decision["generation"] == 2 and decision["step"] > 0  # restored, not from 0

        # kill -9 of the leader's agent: node 0 is elected once the lease expires, and leads
        worker = c.worker_pid(1)
        c.agents[1].proc.send_signal(signal.SIGKILL)
        c.wait("the lost node's worker to die with it", lambda: worker not in c.orphans(), 20)
        c.wait("node 0 elected", lambda: c.events(0, "elected coordinator"))
        c.start(1)  # the replacement campaigns too, and follows
        c.wait_resumed(3, timeout=60)
        keys = read_job(etcd.url, "crash")
        assert keys["leader"].value == b"0"
        assert keys["leader"].create_revision > first.create_revision
        decision = json.loads(keys["decision"].value)
        assert (decision["leader"], decision["term"]) == (0, keys["leader"].create_revision)
        assert c.recoveries(0), "the new leader did not recover"
        assert c.events(1, "shard fetched from a peer"), "the replacement did not fetch"

        # etcd stopped during training (SIGKILL): training goes on, every lease lapses loudly
        etcd.kill(0)

        def lost_everywhere() -> bool:
            return all(c.events(rank, "store_lease_lost") for rank in (0, 1))

        c.wait("both nodes to lose their lease, loudly", lost_everywhere)
        assert all(c.agents[rank].running for rank in (0, 1))  # training goes on
        etcd.restart(0)  # same ports, same data: the agents join again and elect a leader

        def rejoined() -> bool:
            return all(len(c.events(rank, "joined the store")) >= 2 for rank in (0, 1))

        c.wait("both nodes to join the store again", rejoined)
        keys = c.wait("a leader again", lambda: _with_leader(read_job(etcd.url, "crash")))
        leader = int(keys["leader"].value)
        c.fault("crash", 1 - leader)  # recoveries resume after etcd returns
        c.wait_resumed(4, timeout=60)
        # >= 4: a recovery under way when the leases lapsed is deposed and handed over to the
        # new coordinator, which restarts at a generation past the one it prepared
        assert json.loads(read_job(etcd.url, "crash")["decision"].value)["generation"] >= 4
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, steps)
        assert c.orphans() == []
        assert "members/0" not in read_job(etcd.url, "crash")  # leases revoked on the way out


@pytest.mark.parametrize(
    ("store", "why"),
    [
        (["--store", "etcd://nohost"], "expected HOST:PORT"),
        (["--store", "etcd://h:1", "--store-ca", "ca.pem"], "need an etcd+https"),
        (["--store", "etcd+https://h:1", "--store-ca", __file__], "TLS files unusable"),
        (["--store", f"etcd://127.0.0.1:{free_ports(1)[0]}"], "store unavailable"),
    ],
)
def test_a_bad_or_unreachable_store_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], store: list[str], why: str
) -> None:
    port = free_ports(1)[0]
    argv = ["node", "--rank", "0", "--nodes", f"127.0.0.1:{port}", *store, "--", "true"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supervise node: --store "), lines
    assert why in lines[0]


def status_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """``supervise status --json`` run in this process (no interpreter start-up)."""
    capsys.readouterr()
    assert main(["status", *argv, "--json"]) == 0, capsys.readouterr().err
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--store", "embedded"], "lives inside the agents; give --nodes"),
        (["--nodes", "127.0.0.1:1", "--job", "x"], "go with --store"),
        (["--store", "etcd://nohost"], "expected HOST:PORT"),
        (["--store", f"etcd://127.0.0.1:{free_ports(1)[0]}"], "store unavailable"),
    ],
)
@pytest.mark.parametrize("command", [["status"], ["recover", "--latest"]])
def test_status_and_recover_with_a_bad_or_unreachable_store_are_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], command: list[str], argv: list[str], why: str
) -> None:
    assert main([*command, *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"supervise {command[0]}: --"), lines
    assert why in lines[0]


@pytest.mark.slow
def test_a_frozen_leader_is_fenced_and_rejoins_as_a_follower(
    tmp_path: Path, etcd1: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    steps = 2 * LONG  # room for a manual recovery after the fenced one
    with nodes(tmp_path, 2, steps=steps) as c:
        c.options = ["--store", etcd1.url, "--job", "freeze"]
        c.start(0)
        c.wait("node 0 elected", lambda: c.events(0, "elected coordinator"))
        c.start(1)
        c.wait_resumed(1)
        c.wait("node 0's shard replicated", lambda: len(c.events(1, "replica stored")) >= 2)
        # `supervise status --store`: the nodes found from their membership keys
        seen = status_json(capsys, "--store", etcd1.url, "--job", "freeze")
        assert [(n["node"], n["reachable"]) for n in seen["nodes"]] == [(0, True), (1, True)]
        assert {n["coordinator"] for n in seen["nodes"]} == {0}
        c.send(0, signal.SIGSTOP)  # the leader's agent freezes for longer than its lease
        try:
            c.wait("node 1 elected", lambda: c.events(1, "elected coordinator"))
            # membership = live leases: the frozen node's key is gone with its lease
            alone = status_json(capsys, "--store", etcd1.url, "--job", "freeze")
            assert [n["node"] for n in alone["nodes"]] == [1]
            c.fault("crash", 1)  # a failure while the old leader still thinks it leads
            # the quorum guard: one node of two is no majority, so node 1 holds the recovery
            c.wait("the recovery held", lambda: c.events(1, "recovery held: no quorum"))
            assert not c.recoveries(1)
        finally:
            c.send(0, signal.SIGCONT)
        c.wait_resumed(2, timeout=60)
        # `supervise recover --store`: asked of the elected coordinator, which recovers (a
        # request while a recovery runs is refused: on a loaded machine, a peer_lost recovery
        # for the old leader's silence may still run; then it is asked again)

        def manual_recovery() -> bool:
            if "manual" in [r["trigger"] for r in c.recoveries(1)]:
                return True
            capsys.readouterr()
            code = main(["recover", "--store", etcd1.url, "--job", "freeze", "--latest"])
            out, err = capsys.readouterr()
            assert (code, "recovery requested" in out) == (0, True) or (
                code == 1 and "a recovery is in progress" in err
            ), (code, out, err)
            return False

        c.wait("a manual recovery led by node 1", manual_recovery, timeout=60, interval_s=2.0)
        lost = c.events(0, "store_lease_lost")
        assert lost and lost[0]["level"] == "error"  # loud, not silent
        assert len(c.events(0, "joined the store")) == 2  # it campaigns again, as a follower
        keys = read_job(etcd1.url, "freeze")
        assert keys["leader"].value == b"1"
        assert json.loads(keys["decision"].value)["leader"] == 1
        # no double restart: each generation was sent once, and after the freeze by node 1
        sent = [(e["generation"], a.rank) for a, e in c.all_events("restart sent")]
        assert len(sent) == len({gen for gen, _ in sent}), sent
        assert all(rank == 1 for gen, rank in sent if gen >= 2), sent
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, steps)
        assert c.orphans() == []


def _with_leader(keys: dict[str, Record]) -> dict[str, Record] | None:
    return keys if "leader" in keys else None


def revoke(url: str, lease: int) -> None:
    """End ``lease`` in the store now (as after its node froze or was cut off for a TTL)."""

    async def run() -> None:
        store = open_store(parse_store_url(url))
        try:
            await store.revoke(lease)
        finally:
            await store.aclose()

    trio.run(run)


@pytest.mark.slow
def test_on_3_etcd_members_followers_restart_from_the_store_after_a_nan_a_lapse_and_a_loss(
    tmp_path: Path, etcd3: EtcdCluster
) -> None:
    steps = 2 * LONG  # one cluster: a NaN, a lease that lapses, an etcd member killed, a node lost
    with nodes(tmp_path, 2, steps=steps) as c:
        c.options = ["--store", etcd3.url, "--job", "three"]
        c.start(0)
        c.wait("node 0 elected", lambda: c.events(0, "elected coordinator"))
        c.start(1)
        c.wait_resumed(1)
        # the follower's restarts are the store's decisions (the start's included)
        taken = c.events(1, "restart taken from the store")
        assert [(e["generation"], e["leader"]) for e in taken] == [(1, 0)]

        # a NaN: rolled back to a finite version, exactly as with the embedded store
        c.wait("a few snapshots", lambda: len(c.events(1, "replica stored")) >= 2)
        c.fault("nan", 1)
        c.wait_resumed(2)
        rec = c.recoveries(0)[0]
        assert rec["trigger"] == "nan" and not c.recoveries(1)
        decision = json.loads(read_job(etcd3.url, "three")["decision"].value)
        assert (decision["generation"], decision["trigger"]) == (2, "nan")
        assert 0 < decision["step"] < rec["evidence"]["step"]
        taken = c.events(1, "restart taken from the store")
        assert [(e["generation"], e["step"]) for e in taken][-1] == (2, decision["step"])

        # the follower's lease lapses while it lives on: lost by its lease (before any
        # heartbeat timeout), back unchanged, so nothing restarts (the generation stays 2)
        revoke(etcd3.url, read_job(etcd3.url, "three")["members/1"].lease)
        lost = c.wait("node 1 lost by its lease", lambda: c.events(0, "peer lease ended"))
        assert lost[0]["peer"] == 1
        c.wait("node 1 back in the store", lambda: len(c.events(1, "joined the store")) >= 2)
        c.wait(
            "its loss handled",
            lambda: c.events(0, "peer back before its loss was handled: no restart"),
        )
        assert len(c.recoveries(0)) == 1

        # one etcd member of three killed: the agents fail over, and a node loss recovers
        etcd3.kill(0)
        worker = c.worker_pid(1)
        c.agents[1].proc.send_signal(signal.SIGKILL)
        c.wait("the lost node's worker to die with it", lambda: worker not in c.orphans(), 20)
        c.start(1)  # the replacement: same rank, empty RAM
        c.wait_resumed(3, timeout=60)
        assert c.recoveries(0)[-1]["trigger"] in ("peer_lost", "worker_exit")
        assert c.events(1, "shard fetched from a peer"), "the replacement did not fetch"
        decision = json.loads(read_job(etcd3.url, "three")["decision"].value)
        assert (decision["generation"], decision["leader"]) == (3, 0)
        # every restart of a follower, the replacement's included, was the store's decision
        taken = [(a.rank, e["generation"]) for a, e in c.all_events("restart taken from the store")]
        assert taken == [(1, 1), (1, 2), (1, 3)], taken
        assert not c.all_events("restart message refused: no matching decision in the store")
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, steps)
        assert c.orphans() == []
