"""Snapshots every step, fast steps, one copy kept (Gemini's policy): node after node is lost
(kill -9, RAM wiped) and replaced, and every recovery restores a version past the previous
one, never step 0; `supervise status` shows the recoverable point and the replicas' lag.

Before the recoverable point, local retention evicted every version the peer's lagging replica
of the lost rank still held, and the survivor restarted at step 0 (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from nodekit import FAKE_WORKER, FAST_POLICY, Nodes, nodes

pytestmark = pytest.mark.slow

EVERY_STEP = (
    FAST_POLICY.replace("every_steps = 5", "every_steps = 1").replace(
        "keep_last = 2", "keep_last = 1"
    )
    + "[replication]\nreplicas = 2\n"
)
LOSSES = 10


def status(c: Nodes) -> dict[str, Any]:
    """`supervise status --json` of every node (an error entry for one that did not answer)."""
    out = subprocess.run(
        [sys.executable, "-m", "supervise", "status", "--nodes", c.nodes, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    answers: dict[str, Any] = json.loads(out.stdout)
    return answers


def ready(c: Nodes, survivor: int, stored: int, restored: int) -> dict[str, Any] | None:
    """Every node's status once training went on (the survivor stored 150 more of the victim's
    snapshots) and every node knows a recoverable point past the last restore."""
    if len(c.events(survivor, "replica stored")) < stored + 150:
        return None
    answers = status(c)
    if len(answers) < c.n or any("error" in a for a in answers.values()):
        return None
    return answers if all(a["recoverable"] > restored for a in answers.values()) else None


def test_ten_node_losses_in_a_row_never_go_back_to_step_0(tmp_path: Path) -> None:
    worker = [
        sys.executable,
        str(FAKE_WORKER),
        "--faults",
        str(tmp_path / "faults"),
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "10000000",
        "--delay",
        "0",
    ]
    with nodes(tmp_path, 2, policy=EVERY_STEP, worker=worker) as c:
        c.start_all()
        gen = c.wait_resumed(1)
        restored = 0
        for loss in range(LOSSES):
            victim = loss % 2
            survivor = 1 - victim
            stored = len(c.events(survivor, "replica stored"))
            answers = c.wait(
                f"training on and a recoverable point past step {restored}",
                lambda s=survivor, n=stored, r=restored: ready(c, s, n, r),
                interval_s=0.5,
            )
            # the replicas' lag is in every node's status, for each of its ranks
            lags = {int(n): dict(a["replica_lag"]) for n, a in answers.items()}
            assert set(lags) == {0, 1} and set(lags[0]) == {0} and set(lags[1]) == {1}, lags
            assert all(lag >= 0 for per in lags.values() for lag in per.values()), lags
            before = gen
            c.kill_node(victim)
            c.start(victim)  # the replacement: same rank, empty RAM
            gen = c.wait_resumed(gen + 1)
            gave_up = [e for _, e in c.all_events("giving up")]
            assert not gave_up, f"loss {loss + 1}: recovery gave up: {gave_up}"
            restarts = [e for _, e in c.all_events("restart sent") if e["generation"] > before]
            assert restarts and all(r["step"] > 0 for r in restarts), (
                f"loss {loss + 1} of node {victim}: back to step 0: {restarts}"
            )
            step = next(r["step"] for r in restarts if r["generation"] == gen)
            assert step > restored, f"loss {loss + 1} of node {victim}: back to step {step}"
            restored = step
        c.stop()
