"""Snapshots every step, fast steps, one copy kept (Gemini's policy): node after node is lost
(kill -9, RAM wiped) and replaced, and every recovery restores a version past the previous
one, never step 0; `supervise status` shows the recoverable point and the replicas' lag.

Before the recoverable point, local retention evicted every version the peer's lagging replica
of the lost rank still held, and the survivor restarted at step 0 (issue 14)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nodekit import FAST_POLICY, Nodes, nodes

pytestmark = pytest.mark.slow

EVERY_STEP = (
    FAST_POLICY.replace("every_steps = 5", "every_steps = 1").replace(
        "keep_last = 2", "keep_last = 1"
    )
    + "[replication]\nreplicas = 2\n"
)
LOSSES = 3


def endless(*, delay: str) -> dict[str, Any]:
    """`nodes` arguments for fake workers that step until stopped, ``delay`` seconds a step."""
    return {"steps": 10_000_000, "worker_args": ["--delay", delay]}


def status(c: Nodes) -> dict[str, Any]:
    """`supervise status --json` of the cluster (docs/node.md: its nodes and ranks)."""
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
    """Every node's status once training went on (the survivor stored 60 more of the victim's
    snapshots) and every node knows a recoverable point past the last restore."""
    if len(c.events(survivor, "replica stored")) < stored + 60:
        return None
    doc = status(c)
    nodes = doc["nodes"]
    if len(nodes) < c.n or not all(n["reachable"] for n in nodes):
        return None
    points = [n["recoverable"] for n in nodes]
    return doc if all(p is not None and p > restored for p in points) else None


def test_three_node_losses_in_a_row_never_go_back_to_step_0(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, policy=EVERY_STEP, **endless(delay="0")) as c:
        c.start_all()
        gen = c.wait_resumed(1)
        restored = 0
        for loss in range(LOSSES):
            victim = loss % 2
            survivor = 1 - victim
            stored = len(c.events(survivor, "replica stored"))
            doc = c.wait(
                f"training on and a recoverable point past step {restored}",
                lambda s=survivor, n=stored, r=restored: ready(c, s, n, r),
                interval_s=0.5,
            )
            # the replicas' lag is in the status, for each rank (the survivor holds replicas
            # of the victim's rank: its lag is known)
            lags = {r["rank"]: (r["node"], r["lag_steps"]) for r in doc["ranks"]}
            assert set(lags) == {0, 1} and all(lags[r][0] == r for r in lags), lags
            assert lags[victim][1] is not None, lags
            assert all(lag is None or lag >= 0 for _, lag in lags.values()), lags
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


EVERY_SECOND = EVERY_STEP + "every_seconds = 1.0\n"


def newest(doc: dict[str, Any], rank: int) -> int:
    return next(r["newest"] for r in doc["ranks"] if r["rank"] == rank) or 0


def test_replication_every_seconds_pushes_that_often_and_a_node_loss_goes_back_to_the_point(
    tmp_path: Path,
) -> None:
    # snapshots every step (about 100 a second), replication.every_seconds = 1: the peers get
    # about one version a second, the recoverable point's, and a node loss restores it
    with nodes(tmp_path, 2, policy=EVERY_SECOND, **endless(delay="0.01")) as c:
        c.start_all()
        gen = c.wait_resumed(1)
        first = c.wait("a recoverable point", lambda: status(c)["nodes"][0]["recoverable"])
        t0, pushed0 = time.monotonic(), len(c.events(0, "pushed"))
        doc = c.wait(
            "200 steps more and a newer recoverable point",
            lambda: (
                d
                if newest(d := status(c), 0) >= first + 200
                and all((n["recoverable"] or 0) > first for n in d["nodes"])
                else None
            ),
            interval_s=0.5,
        )
        pushes = len(c.events(0, "pushed")) - pushed0
        elapsed = time.monotonic() - t0
        assert 1 <= pushes <= elapsed / 1.0 + 3, (pushes, elapsed, newest(doc, 0) - first)
        point = min(n["recoverable"] for n in doc["nodes"])
        c.kill_node(1)
        c.start(1)  # the replacement: same rank, empty RAM
        gen = c.wait_resumed(gen + 1)
        restarts = [e for _, e in c.all_events("restart sent") if e["generation"] == gen]
        assert restarts and all(r["step"] >= point for r in restarts), (point, restarts)
        c.stop()
