"""The README's quickstart as written: examples/quickstart_train.py (the exact code the README
and docs/snapshots.md show) trains under two `supervise node` agents on loopback (gloo, CPU);
a worker is killed mid-run, the cluster restores it from a snapshot and training finishes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from supervise._testing import LocalCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "quickstart_train.py"
STEPS = 3000  # long enough that the kill below lands mid-run, even on a fast machine
SNAPSHOTTED = 50  # the worker is killed once a version this new is replicated
POLICY = """
[snapshot]
every_steps = 10
[recovery]
heartbeat_timeout = 60.0
startup_timeout = 120.0
[recovery.backoff]
initial = 0.1
max = 0.5
jitter = 0.0
[cluster]
heartbeat_interval = 0.2
peer_timeout = 5.0
rejoin_timeout = 120.0
"""


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


@pytest.mark.parametrize("page", ["README.md", "docs/snapshots.md"])
def test_the_docs_show_the_quickstart_script_exactly(page: str) -> None:
    script = EXAMPLE.read_text()
    assert script in _python_blocks((ROOT / page).read_text()), (
        f"{page}: the quickstart block differs from examples/quickstart_train.py"
    )


def _replicated(cluster: LocalCluster, at_least: int) -> bool:
    """Node 0 holds a replica of rank 1's shard at a version >= ``at_least``."""
    for line in cluster.events(0, "replica stored"):
        found = re.fullmatch(r"rank 1 v(\d+) g\d+", str(line.get("shard")))
        if found and int(found[1]) >= at_least:
            return True
    return False


def _output(cluster: LocalCluster, rank: int) -> list[str]:
    return [
        str(x.get("line"))
        for agent in cluster.started
        if agent.rank == rank
        for x in agent.events("process_output")
    ]


def test_quickstart_survives_a_worker_crash_under_two_agents(tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLE), "--steps", str(STEPS)]
    with LocalCluster(tmp_path, 2, command=command, policy=POLICY, wait_s=240.0) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait(f"node 0 to hold rank 1's v{SNAPSHOTTED}", lambda: _replicated(c, SNAPSHOTTED))
        c.crash_worker(1)
        c.wait_resumed(2)
        rec = c.events(0, "recovery")[0]
        assert rec["trigger"] == "worker_exit", rec
        restart = next(e for e in c.events(0, "restart sent") if e["generation"] >= 2)
        # from a snapshot taken mid-run: the recoverable point, which the nodes agree on in
        # heartbeat rounds and may trail the newest replica (v50 here) on a fast machine
        assert restart["step"] >= 10 and restart["step"] % 10 == 0, restart
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        for rank in (0, 1):
            lines = _output(c, rank)
            assert f"rank {rank}: fresh start" in lines, lines
            assert f"rank {rank}: resumed after step {restart['step']}" in lines, lines
            assert f"rank {rank}: finished {STEPS} steps" in lines, lines
        assert c.orphans() == []
