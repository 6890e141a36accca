"""Coordinator loss on each store, side by side in one run: what losing or freezing the
coordinator costs with ``--store etcd`` (an elected leader on leases) against the embedded
store (the lowest live rank coordinates).

Real node agents on loopback (2 nodes x 1 worker) running the torch-free fake worker of the
agent tests (``tests/agents/fake_worker.py``: a deterministic step, a per-step barrier, RAM
snapshots every 5 steps), the agent tests' fast policy (peer_timeout 2 s: the lease TTL), and
one real etcd member (Debian's ``etcd-server``) on loopback:

- embedded, coordinator loss: ``kill -9`` of node 0's agent (the coordinator) and its worker,
  a replacement agent (empty RAM) started at once;
- etcd, leader loss: the same, on the elected leader's node;
- etcd, leader freeze: ``SIGSTOP`` of the leader's agent for a lease TTL + 1 s, then
  ``SIGCONT`` (its peer cannot recover without it: with two nodes the quorum is both).

Measured: seconds from the fault to the moment every node logged ``training resumed`` at the
next generation (the agents' log timestamps), and each run must end bit-exact.

    python benchmarks/store.py            # 3 trials per case
    python benchmarks/store.py --trials 1

Writes the "## Coordination store" section of benchmarks/RESULTS.md (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests" / "agents"
sys.path.insert(0, str(TESTS))

from nodekit import FAST_POLICY, Nodes  # noqa: E402
from test_node_recovery import assert_exact  # noqa: E402

from supervise._testing.etcd import EtcdCluster, install_etcd  # noqa: E402

RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- store:begin -->", "<!-- store:end -->"
STEPS = 600  # long enough for a fault and its recovery (the fake step is ~10-20 ms)
TTL_S = 2.0  # FAST_POLICY's cluster.peer_timeout: the lease TTL

Fault = Callable[[Nodes, int], None]


def _stamp(line: dict[str, object]) -> float:
    text = str(line["timestamp"]).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def _resumed_at(c: Nodes, generation: int) -> float:
    """When the last node logged ``training resumed`` at ``generation`` or later."""
    when = []
    for rank in c.agents:
        lines = [x for x in c.events(rank, "training resumed") if x["generation"] >= generation]
        when.append(min(_stamp(x) for x in lines))
    return max(when)


def _kill(c: Nodes, rank: int) -> None:
    worker = c.worker_pid(rank)
    c.agents[rank].proc.send_signal(signal.SIGKILL)
    c.wait("the worker to die with its agent", lambda: worker not in c.orphans(), 20)
    c.start(rank)  # a replacement, empty RAM


def _freeze(c: Nodes, rank: int) -> None:
    c.send(rank, signal.SIGSTOP)
    try:
        time.sleep(TTL_S + 1.0)
    finally:
        c.send(rank, signal.SIGCONT)


def _trial(base: Path, url: str | None, fault: Fault, job: str) -> float:
    """One run: start, fault the coordinator, wait for the next generation; its seconds."""
    with Nodes(base, 2, steps=STEPS, policy=FAST_POLICY) as c:
        if url is not None:
            c.options = ["--store", url, "--job", job]
            c.start(0)
            c.wait("node 0 elected", lambda: c.events(0, "elected coordinator"))
            c.start(1)
        else:
            c.start_all()
        c.wait_resumed(1)
        c.wait("a few snapshots", lambda: len(c.events(1, "replica stored")) >= 3)
        t0 = time.time()
        fault(c, 0)
        gen = c.wait_resumed(2, timeout=90)
        seconds = _resumed_at(c, gen) - t0
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, STEPS)
        assert c.orphans() == []
    return seconds


def _stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    binary = install_etcd()
    load0 = os.getloadavg()
    started = time.time()
    cases: dict[str, list[float]] = {"embedded": [], "etcd_loss": [], "etcd_freeze": []}
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        root = Path(tmp)
        with EtcdCluster(root / "etcd", binary=binary) as etcd:
            for i in range(args.trials):  # interleaved: the machine's load hits all alike
                for case, url, fault in (
                    ("embedded", None, _kill),
                    ("etcd_loss", etcd.url, _kill),
                    ("etcd_freeze", etcd.url, _freeze),
                ):
                    base = root / f"{case}-{i}"
                    base.mkdir()
                    seconds = _trial(base, url, fault, f"{case}-{i}")
                    cases[case].append(seconds)
                    print(f"{case} trial {i}: {seconds:.2f} s", flush=True)
    minutes = (time.time() - started) / 60
    load1 = os.getloadavg()
    emb = statistics.median(cases["embedded"])
    loss = statistics.median(cases["etcd_loss"])
    freeze = statistics.median(cases["etcd_freeze"])
    target = emb + TTL_S
    rows = [_stats(cases[case]) for case in ("embedded", "etcd_loss", "etcd_freeze")]
    section = f"""## Coordination store (`benchmarks/store.py`)

What: the cost of losing or freezing the coordinator, `--store etcd` (an elected leader on
leases, decisions fenced, the quorum guard) against the embedded store (the lowest live rank
coordinates), side by side in one run: seconds from the fault to every node's `training
resumed` at the next generation (agent log timestamps). 2 nodes x 1 worker (the agent tests'
torch-free fake worker, {STEPS} steps, RAM snapshots every 5 steps), the agent tests' fast
policy (peer_timeout = lease TTL = {TTL_S:g} s, heartbeats every 0.2 s), one etcd 3.4 member on
loopback; every run ends bit-exact.

Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python
{platform.python_version()}; load average {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the
start, {load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at the end (shared cores: expect noise).
Measured {time.strftime("%Y-%m-%d", time.gmtime())}, {minutes:.0f} min, {args.trials} trial(s)
per case, interleaved.

| case | fault | to every node resumed, median (range) |
| --- | --- | ---: |
| embedded store | `kill -9` of the coordinator's agent, replacement at once | {rows[0]} |
| etcd | `kill -9` of the leader's agent, replacement at once | {rows[1]} |
| etcd | `SIGSTOP` of the leader's agent for TTL + 1 s, then `SIGCONT` | {rows[2]} |

Target: a leader loss costs at most one lease TTL plus today's recovery: {loss:.2f} s against
{emb:.2f} s + {TTL_S:g} s = {target:.2f} s ({"met" if loss <= target else "missed"}). The freeze
({freeze:.2f} s) includes the {TTL_S + 1:g} s the agent is stopped: with two nodes the quorum is
both, so nothing restarts until the frozen node is back (its lease lost, it rejoins as a
follower; its old decisions would be refused).

Reproduce: `python benchmarks/store.py --trials {args.trials}`.
"""
    print(section)
    if not args.no_write:
        text = RESULTS.read_text()
        block = f"{BEGIN}\n{section}{END}"
        if BEGIN in text:
            head, rest = text.split(BEGIN, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
