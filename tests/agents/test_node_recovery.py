"""Real node agents on loopback with torch-free workers: each failure kind is detected,
recovered cluster-wide from RAM, and training ends exactly where a failure-free run ends."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_worker import SIZE, advance
from nodekit import FAST_POLICY, free_ports, nodes

from supervise.snapshot.arena import Arena

pytestmark = pytest.mark.slow

STEPS = 120
DOCS = Path(__file__).resolve().parents[2] / "docs" / "node.md"
LONG = 200


def expected_state(steps: int = STEPS) -> np.ndarray:
    state = np.zeros(SIZE, dtype=np.float64)
    for step in range(steps):
        advance(state, step)
    return state


def assert_exact(out: Path, ranks: int, steps: int = STEPS) -> None:
    want = expected_state(steps)
    for r in range(ranks):
        got = np.frombuffer((out / f"final-rank{r}.npy").read_bytes(), dtype=np.float64)
        assert np.array_equal(got, want), f"rank {r} diverged from a failure-free run"


def test_worker_crash_recovers_from_ram_and_finishes_exactly(tmp_path: Path) -> None:
    with nodes(tmp_path, 2) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("a few snapshots", lambda: len(c.events(0, "replica stored")) >= 2)
        c.fault("crash", 1)
        c.wait_resumed(2)
        rec = c.recoveries(0)[0]
        assert rec["trigger"] == "worker_exit"
        assert rec["evidence"]["node"] == 1 and rec["evidence"]["exit_code"] == 7
        restart = next(e for e in c.events(0, "restart sent") if e["generation"] >= 2)
        assert restart["step"] > 0  # restored from a snapshot, not from scratch
        for node in (0, 1):  # the new generation ran in the spares waiting since the start,
            started = [e for e in c.events(node, "workers started") if e["generation"] >= 2]
            assert started and started[0]["warm"] == [node], started
            assert started[0]["forked"] == [node], started  # forked from the node's template
            (template,) = {e["pid"] for e in c.events(node, "spare template ready")}
            assert {e["template"] for e in c.events(node, "spare worker forked")} == {template}
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2)
        assert c.orphans() == []


PAUSE_AT, PAUSE_S = 20, 2.5  # an "evaluation" of ~100 step times, under the timeout
HANG_TIMEOUT = 30.0
ADAPTIVE_POLICY = FAST_POLICY.replace(
    "heartbeat_timeout = 3.0",
    f'heartbeat_timeout = {HANG_TIMEOUT}\nhang_detection = "adaptive"\nhang_min_silence = 1.5',
)


def test_hang_is_flagged_in_a_few_step_times_and_a_paused_evaluation_is_not(
    tmp_path: Path,
) -> None:
    # The adaptive detector flags a SIGSTOPped worker within a few of its step times (here
    # its 1.5 s floor), far inside heartbeat_timeout, and the cluster recovers; an evaluation
    # of many step times inside a pause (`Snapshotter.pause`'s request) is no hang.
    assert ADAPTIVE_POLICY != FAST_POLICY
    args = ["--pause-at", str(PAUSE_AT), "--pause-s", str(PAUSE_S)]
    with nodes(tmp_path, 2, policy=ADAPTIVE_POLICY, worker_args=args) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait(
            "both ranks to end their evaluation",
            lambda: all(c.events(node, "pause ended") for node in (0, 1)),
        )
        c.wait("snapshots after it", lambda: len(c.events(0, "replica stored")) >= 7)
        assert c.recoveries(0) == [], "the paused evaluation was taken for a hang"
        c.hang_worker(1)
        c.wait_resumed(2)
        rec = c.recoveries(0)[0]
        evidence = rec["evidence"]
        assert rec["trigger"] == "heartbeat_timeout"
        assert (evidence["rank"], evidence["state"]) == (1, "stopped"), evidence
        assert evidence["heartbeat_timeout_s"] == HANG_TIMEOUT
        assert evidence["limit_s"] < HANG_TIMEOUT / 4, evidence  # the step history's verdict
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2)
        assert c.orphans() == []


def test_nan_rolls_back_to_a_finite_version(tmp_path: Path) -> None:
    with nodes(tmp_path, 2) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("a snapshot", lambda: len(c.events(1, "replica stored")) >= 1)
        c.fault("nan", 1)
        c.wait_resumed(2)
        rec = c.recoveries(0)[0]
        assert rec["trigger"] == "nan"
        assert rec["evidence"]["metrics"] == {"loss": "nan"}
        restart = next(e for e in c.events(0, "restart sent") if e["generation"] >= 2)
        assert restart["step"] < rec["evidence"]["step"]
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2)


def test_lost_node_is_replaced_and_fetches_its_shard_from_a_peer(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, steps=LONG) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait(
            "node 1's shard replicated to node 0", lambda: len(c.events(0, "replica stored")) >= 2
        )
        worker = c.worker_pid(1)
        c.agents[1].proc.send_signal(signal.SIGKILL)
        c.wait("the lost node's worker to die with it", lambda: worker not in c.orphans(), 20)
        c.wait("peer_lost", lambda: c.recoveries(0))
        c.start(1)  # the replacement: same rank, empty RAM (a fresh shm dir)
        c.wait_resumed(2)
        rec = c.recoveries(0)[0]
        # The surviving rank's collective breaks before the failure detector times out, so
        # the first report is often its worker's exit; either way the cluster waited for node 1.
        assert rec["trigger"] in ("peer_lost", "worker_exit")
        assert c.events(1, "shard fetched from a peer"), "the replacement did not fetch its shard"
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)
        assert c.orphans() == []


def test_lost_coordinator_is_replaced_and_the_survivor_leads_the_recovery(
    tmp_path: Path,
) -> None:
    # Node 0 led generation 1; its replacement (a new process, same rank) must not be taken
    # for that leader, or each node would wait for the other to coordinate.
    with nodes(tmp_path, 2, steps=LONG) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("node 0's shard replicated", lambda: len(c.events(1, "replica stored")) >= 2)
        worker = c.worker_pid(0)
        c.agents[0].proc.send_signal(signal.SIGKILL)
        c.wait("the lost node's worker to die with it", lambda: worker not in c.orphans(), 20)
        c.start(0)
        c.wait_resumed(2, timeout=60)
        assert c.recoveries(1), "the surviving node did not lead the recovery"
        assert c.events(0, "shard fetched from a peer"), "the replacement did not fetch"
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)
        assert c.orphans() == []


def test_a_lost_group_falls_back_to_the_persist_tier(tmp_path: Path) -> None:
    # No peer holds a copy (replicas = 1): the replacement node's shard comes from disk.
    policy = (
        FAST_POLICY + '[replication]\nreplicas = 1\n[persist]\nevery_snapshots = 1\npath = "ckpt"\n'
    )
    with nodes(tmp_path, 2, steps=LONG, policy=policy) as c:
        c.start_all()
        c.wait_resumed(1)
        # a committed file, not the temp file of a write still in progress
        committed = "*/step-*.rank-00001.safetensors"  # in the job's directory
        c.wait("rank 1 persisted", lambda: list((tmp_path / "ckpt").glob(committed)))
        worker = c.worker_pid(1)
        c.agents[1].proc.send_signal(signal.SIGKILL)
        c.wait("the lost node's worker to die with it", lambda: worker not in c.orphans(), 20)
        c.start(1)  # the replacement: empty RAM, and no peer holds its shard
        c.wait_resumed(2)
        assert c.events(1, "shard loaded from disk"), "the replacement did not load from disk"
        # its commit hooks ran on the loader's thread, without reaching for the trio registry
        hooks = [x for x in c.events(1) if "hook" in str(x.get("event"))]
        assert hooks == [], hooks
        assert not c.events(1, "shard fetched from a peer")
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)
        assert c.orphans() == []


def test_recovery_gives_up_after_max_attempts(tmp_path: Path) -> None:
    policy = FAST_POLICY.replace("max_attempts = 4", "max_attempts = 2")
    with nodes(tmp_path, 2, policy=policy) as c:
        c.start_all()
        c.wait_resumed(1)
        for gen in (1, 2, 3):
            c.wait(f"generation {gen} running", lambda g=gen: c.resumed(1, g))
            c.fault("crash", 1)
            if gen < 3:
                c.wait(
                    f"restart {gen + 1}",
                    lambda g=gen: any(
                        e["generation"] == g + 1 for e in c.events(0, "restart sent")
                    ),
                )
        assert c.wait_exit(0) == 3 and c.wait_exit(1) == 3
        gave_up = c.events(0, "giving up")
        assert gave_up and "recovery exhausted" in gave_up[0]["reason"]
        assert "recovery.max_attempts = 2" in gave_up[0]["reason"]
        assert c.orphans() == []


def test_sigterm_stops_everything_in_order_with_no_orphans(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, steps=100_000) as c:
        c.start_all()
        c.wait_resumed(1)
        workers = [c.worker_pid(0), c.worker_pid(1)]
        for a in c.agents.values():
            a.proc.send_signal(signal.SIGTERM)
        assert c.wait_exit(0) == 128 + signal.SIGTERM
        assert c.wait_exit(1) == 128 + signal.SIGTERM
        assert c.orphans() == [], workers


def test_corrupt_shard_is_refetched_from_a_peer(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, steps=LONG) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("replicas", lambda: len(c.events(0, "replica stored")) >= 3)
        # Freeze rank 1 (its arena stops changing), flip a byte in the data of every version
        # it committed, then kill it: its restore must detect the damage, and the cluster
        # recovers from the copy node 0 holds.
        worker = c.worker_pid(1)
        os.kill(worker, signal.SIGSTOP)
        damaged = 0
        for path in c.shm(1).glob("*.arena"):
            arena = Arena.open(path)
            try:
                for committed in arena.committed():
                    arena.data(committed.slot)[0] ^= 0xFF
                    damaged += 1
            finally:
                arena.close()
        assert damaged >= 1
        os.kill(worker, signal.SIGKILL)
        c.wait(
            "rank 1's shard fetched again from node 0",
            lambda: c.events(1, "shard fetched from a peer"),
            120,
        )
        failed = [e["error"] for e in c.events(0, "recovery attempt failed")]
        checksum = [r for r in c.recoveries(0) if r["trigger"] == "checksum"]
        assert checksum or "checksum on node 1" in failed, (failed, c.recoveries(0))
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, LONG)


def test_status_and_manual_recover_to_an_older_version(tmp_path: Path) -> None:
    # Versions stay 400 steps (8 s): the three CLI round trips below must not outlast the
    # chosen version, even on a loaded machine where each takes seconds.
    policy = FAST_POLICY.replace("keep_last = 2", "keep_last = 40").replace(
        "every_steps = 5", "every_steps = 10"
    )
    steps = 1000  # 20 s of training: the CLI round trips below must happen mid-run
    with nodes(tmp_path, 2, steps=steps, policy=policy) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("a few snapshots", lambda: len(c.events(0, "replica stored")) >= 3)
        refused = cli("recover", "--nodes", c.nodes, "--version", "100000")
        assert refused.returncode == 1
        assert "cannot recover to version 100000: version 100000 is held nowhere" in refused.stderr
        status = cli("status", "--nodes", c.nodes, "--json")
        assert status.returncode == 0, status.stderr
        seen = json.loads(status.stdout)
        assert {n["state"] for n in seen["nodes"]} == {"running"}
        held = {(e["rank"], e["step"]) for n in seen["nodes"] for e in n["ram"]}
        common = {s for r, s in held if r == 1 and (0, s) in held}
        version = max(common)  # complete on both ranks, and older than the training by now
        table = cli("status", "--nodes", c.nodes)
        assert re.search(r"rank 1 v\d+: node 0 RAM \(replica\), node 1 RAM \(local\)", table.stdout)
        asked = cli("recover", "--nodes", c.nodes, "--version", str(version))
        assert asked.returncode == 0, asked.stderr
        assert f"recovery requested at version {version}" in asked.stdout
        c.wait_resumed(2)
        rec = c.recoveries(0)[0]
        assert rec["trigger"] == "manual" and rec["evidence"]["version"] == version
        restart = next(e for e in c.events(0, "restart sent") if e["generation"] >= 2)
        assert restart["step"] == version
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, steps)  # replaying from an older version changes nothing


def documented_status_fields() -> dict[str, set[str]]:
    """docs/node.md's table of `status --json` fields: path -> its types (``int``, ``float``,
    ``str``, ``bool``, ``null``, ``list``, ``list of int``, ``object``)."""
    text = DOCS.read_text().split("<!-- status-json-fields", 1)[1]
    fields: dict[str, set[str]] = {}
    for line in text.splitlines()[1:]:
        row = re.match(r"\| `([^`]+)` \| ([^|]+) \|", line)
        if row:
            fields[row[1]] = {t.strip() for t in row[2].split(" or ")}
        elif fields and not line.startswith("|"):
            break
    assert fields, "docs/node.md: no status-json-fields table"
    return fields


SCALAR_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def _is(value: object, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind in SCALAR_TYPES:
        return type(value) is SCALAR_TYPES[kind]  # exactly: True is no int, 1 no float
    if kind == "object":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list) and all(isinstance(x, dict) for x in value)
    if kind == "list of int":
        return isinstance(value, list) and all(type(x) is int for x in value)
    raise AssertionError(f"docs/node.md: unknown type {kind!r}")


def check_documented(obj: dict[str, object], fields: dict[str, set[str]], prefix: str = "") -> int:
    """Every key of ``obj`` (at ``prefix``) is documented, with a documented type, and every
    documented key is there; nested objects likewise. Returns the number of fields checked."""
    base = f"{prefix}." if prefix else ""
    want = {p[len(base) :] for p in fields if p.startswith(base) and "." not in p[len(base) :]}
    assert set(obj) == want, f"{prefix or 'top'}: {sorted(set(obj) ^ want)} differ from the docs"
    checked = 0
    for key, value in obj.items():
        path = base + key
        assert any(_is(value, k) for k in fields[path]), f"{path} = {value!r}: not {fields[path]}"
        checked += 1
        if "list" in fields[path] and isinstance(value, list):
            for item in value:
                assert isinstance(item, dict)
                checked += check_documented(item, fields, f"{path}[]")
    return checked


def test_status_json_has_the_documented_fields_and_shows_workers_progress_and_lag(
    tmp_path: Path,
) -> None:
    fields = documented_status_fields()
    with nodes(tmp_path, 2, steps=1000) as c:  # 20 s of training: status runs mid-run
        c.start_all()
        c.wait_resumed(1)
        for holder in (0, 1):
            c.wait("replicas", lambda h=holder: len(c.events(h, "replica stored")) >= 2)

        def answered() -> dict[str, Any] | None:
            run = cli("status", "--nodes", c.nodes, "--json")
            assert run.returncode == 0, run.stderr
            doc: dict[str, Any] = json.loads(run.stdout)
            refilled = all(n["spare_pids"] for n in doc["nodes"])  # after the first start
            return doc if refilled else None

        doc = c.wait("spares waiting on every node", answered, interval_s=0.5)
        assert check_documented(doc, fields) > 40
        assert doc["schema"] == 1
        for node in doc["nodes"]:
            n = node["node"]
            agent = c.agents[n]
            assert node["reachable"] and node["error"] is None and node["state"] == "running"
            assert node["agent_pid"] == agent.pid and node["ranks"] == [n]
            assert node["guard_pid"] in children_of(agent.pid)
            assert set(node["spare_pids"]) <= children_of(agent.pid)
            started = c.events(n, "workers started")[-1]
            (worker,) = node["workers"]
            assert worker["pid"] == started["pids"][str(n)]
            assert worker["pid"] not in node["spare_pids"]
            assert worker["spare"] == (n in started["warm"]) and worker["alive"]
            assert worker["last_step"] >= 0 and worker["last_step_age_s"] >= 0.0
            assert {e["held_as"] for e in node["ram"] if e["rank"] == n} == {"own"}
            assert {e["held_as"] for e in node["ram"] if e["rank"] != n} == {"replica"}
        for rank in doc["ranks"]:
            assert rank["node"] == rank["rank"]
            assert rank["replica_nodes"] == [1 - rank["rank"]]
            assert rank["newest"] >= rank["newest_replica"] >= 0
            assert rank["lag_steps"] == rank["newest"] - rank["newest_replica"]
            assert rank["lag_versions"] >= 0
        table = cli("status", "--nodes", c.nodes).stdout
        assert re.search(
            r"^rank +node +worker pid +last step +age +newest +replica +lag$", table, re.M
        ), table
        assert re.search(r"^0 +0 +\d+ \(spare\) +\d+ +[\d.]+s +v\d+ +v\d+ on node 1 ", table, re.M)
        assert "guard pid" in table and "spares waiting" in table
        assert c.stop() == {0: 143, 1: 143}  # (the end of training is other tests' business)


def children_of(pid: int) -> set[int]:
    """The PIDs whose parent is ``pid`` (from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def test_status_reports_an_unreachable_node(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    status = cli("status", "--nodes", dead, "--timeout", "0.5")
    assert status.returncode == 1
    assert "node 0: unreachable" in status.stdout
    assert "--curve-keys DIR" in status.stderr  # the hint: a CURVE cluster looks down without keys
    as_json = cli("status", "--nodes", dead, "--timeout", "0.5", "--json")
    assert as_json.returncode == 1
    doc = json.loads(as_json.stdout)
    check_documented(doc, documented_status_fields())  # the same fields, null where unknown
    (node,) = doc["nodes"]
    assert node["reachable"] is False and node["error"] and node["state"] is None
    assert node["endpoint"] == dead and doc["ranks"] == []


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervise", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
