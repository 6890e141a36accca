"""Strangers on the agents' port, as a hostile peer would probe it (issue 15), against real
node agents: nothing is read, nothing forged is stored or restored, no forged failure,
heartbeat or give_up restarts or stops the job, one small header reserves no memory, and a
push announced at the whole memory budget before the workers start does not starve their
arenas. Once unauthenticated on loopback (strangers claiming ranks), once with CURVE (a client
key, a node key, no key)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from fake_worker import SIZE, advance
from nodekit import FAST_POLICY, nodes

from supervise.agents import messages as m
from supervise.cluster import CurveKeys, RemoteError, RequestTimeout, Transport, generate_keys
from supervise.cluster.membership import Heartbeat
from supervise.cluster.replication import KINDS, PushBegin, PushReady, fetch_shard

pytestmark = pytest.mark.slow

STEPS = 400
MiB = 1 << 20
BUDGET = 64 * MiB
POLICY = FAST_POLICY.replace("keep_last = 2", f'keep_last = 2\nmemory_budget = "{BUDGET}"')
ALL = (*m.ALL_KINDS, *KINDS, Heartbeat)


def assert_exact(out: Path, steps: int = STEPS) -> None:
    """Every rank ends where a failure-free run ends: nothing forged was ever restored."""
    want = np.zeros(SIZE, dtype=np.float64)
    for step in range(steps):
        advance(want, step)
    for r in range(2):
        got = np.frombuffer((out / f"final-rank{r}.npy").read_bytes(), dtype=np.float64)
        assert np.array_equal(got, want), f"rank {r} diverged from a failure-free run"


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def begin(rank: int, nbytes: int, version: int = 2000) -> PushBegin:
    """A push announcement: 105-odd bytes that ask for ``nbytes`` of the holder's RAM."""
    return PushBegin(rank, version, 0, nbytes, [("t", 0, nbytes, 0)])


async def refused(coro: Any) -> str:
    """The one-line error a refused request gets back."""
    with pytest.raises(RemoteError) as err:
        await coro
    return str(err.value)


async def _speak_first_for_rank_1(endpoint: str) -> int:
    """Before node 1 starts, a stranger claims rank 1 and announces a push at the budget."""
    liar = Transport(rank=1, peers={0: endpoint}, kinds=ALL)
    async with liar.running():
        ready = await liar.request(
            0, begin(1, BUDGET - 4096), [b"m"], timeout=60.0, expect=PushReady
        )
    return int(ready.body.transfer)


async def _loopback_forgeries(ep0: str, ep1: str) -> None:
    client = Transport(rank=None, peers={0: ep0, 1: ep1}, kinds=ALL)
    liar = Transport(rank=1, peers={0: ep0}, kinds=ALL)  # node 1 is alive: its rank is taken
    async with client.running(), liar.running():
        # a forged read: no replica leaves for a client or a second "node 1"
        why = await refused(fetch_shard(client, 0, 1, timeout=10.0))
        assert "refused: a client asked for rank 1" in why
        why = await refused(fetch_shard(liar, 0, 1, timeout=10.0))
        assert "rank 1 already speaks on another live connection" in why
        # forged pushes (version 2000) and the 105-byte amplification (40 MiB announced)
        for who, t in (("a client pushed", client), ("already speaks", liar)):
            why = await refused(t.request(0, begin(1, 40 * MiB), [b"m"], timeout=10.0))
            assert who in why
        # node 0 is the coordinator: nobody else gives it orders or reports for node 1
        await client.send(0, m.GiveUp("forged", 0))
        await liar.send(0, m.GiveUp("forged", 0))
        await client.send(1, m.GiveUp("forged", 0))
        await client.send(0, m.Failure(1, 1, "worker_exit", 0.0, 0.0))
        await liar.send(0, m.Failure(1, 1, "worker_exit", 0.0, 0.0))
        await liar.send(0, Heartbeat(1, secrets.randbits(62), 1, {}))  # a new incarnation
        await client.send(0, Heartbeat(1, secrets.randbits(62), 1, {}))
        await trio.sleep(1.0)  # one-way messages: let them arrive before the links close


def refusals(c: Any, rank: int) -> set[str]:
    return {e["kind"] for e in c.events(rank, "message refused")}


def test_strangers_on_unauthenticated_loopback(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, policy=POLICY, steps=STEPS) as c:
        c.start(0)
        # budget-sized amplification at start-up: it is taken (the stranger spoke first for
        # rank 1, as anyone on this host may without keys), and gives way to the arenas
        assert trio.run(_speak_first_for_rank_1, c.endpoints[0]) > 0
        c.start(1)
        c.wait_resumed(1)
        c.wait("replicas", lambda: len(c.events(0, "replica stored")) >= 2)
        before, stored = rss(c.agents[0].pid), len(c.events(0, "replica stored"))
        trio.run(_loopback_forgeries, *c.endpoints)
        assert rss(c.agents[0].pid) - before < 20 * MiB  # 40 MiB announced: not mapped
        c.wait("real pushes still stored", lambda: len(c.events(0, "replica stored")) > stored)
        # one-way messages: their refusals are logged when they arrive (a loaded machine)
        expected = {"replica.fetch_open", "replica.push_begin", "agent.give_up", "agent.failure"}
        c.wait("refusals", lambda: expected | {"membership.heartbeat"} <= refusals(c, 0))
        c.wait("refusals at node 1", lambda: "agent.give_up" in refusals(c, 1))
        c.fault("crash", 1)  # a real failure: restored from the real replicas only
        c.wait_resumed(2)
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert [r["trigger"] for r in c.recoveries(0)] == ["worker_exit"]  # nothing forged ran
        assert_exact(c.out)
        assert c.orphans() == []


async def _curve_forgeries(keys: Path, ep0: str) -> None:
    client = Transport(rank=None, peers={0: ep0}, curve=CurveKeys.load(keys, "client"), kinds=ALL)
    node1 = Transport(rank=1, peers={0: ep0}, curve=CurveKeys.for_node(keys, 1), kinds=ALL)
    plain = Transport(rank=1, peers={0: ep0}, kinds=ALL)  # no key at all
    async with client.running(), node1.running(), plain.running():
        status = await client.request(0, m.StatusQuery(), timeout=10.0, expect=m.Status)
        assert status.body.node == 0  # a client key may ask
        assert "a client asked" in await refused(fetch_shard(client, 0, 1, timeout=10.0))
        why = await refused(client.request(0, begin(1, 40 * MiB), [b"m"], timeout=10.0))
        assert "a client pushed" in why
        why = await refused(node1.request(0, begin(1, 40 * MiB), [b"m"], timeout=10.0))
        assert "rank 1 already speaks" in why  # node 1's key, not node 1's connection
        await client.send(0, m.GiveUp("forged", 0))
        await node1.send(0, m.GiveUp("forged", 0))
        await client.send(0, m.Failure(1, 1, "worker_exit", 0.0, 0.0))
        with pytest.raises(RequestTimeout):  # no key: no handshake
            await plain.request(0, m.StatusQuery(), timeout=1.0)
        await trio.sleep(1.0)


def test_strangers_with_curve(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, 2)
    policy = POLICY + f'[replication]\ncurve = true\ncurve_keys = "{keys}"\n'
    with nodes(tmp_path, 2, policy=policy, steps=STEPS // 2) as c:  # no failure: shorter
        c.start_all()
        c.wait_resumed(1)
        c.wait("replicas", lambda: len(c.events(0, "replica stored")) >= 2)
        stored = len(c.events(0, "replica stored"))
        trio.run(_curve_forgeries, keys, c.endpoints[0])
        c.wait("real pushes still stored", lambda: len(c.events(0, "replica stored")) > stored)
        expected = {"replica.fetch_open", "replica.push_begin", "agent.give_up", "agent.failure"}
        c.wait("refusals", lambda: expected | {"handshake"} <= refusals(c, 0))
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert c.recoveries(0) == []  # nothing forged ran a recovery
        assert_exact(c.out, STEPS // 2)
        assert c.orphans() == []
