"""Real node agents on loopback: a process of the same user on the host, with no token, a
forged one, another node's worker's token, or a token stolen from a worker of another rank,
cannot commit, drop or report anything for a rank that is not its token's. Nothing is
restarted by its reports, nothing it tried to commit is replicated or restored, and training
ends exactly where a failure-free run ends."""

from __future__ import annotations

import math
from pathlib import Path

import msgpack
import pytest
from nodekit import FAST_POLICY, nodes
from test_node_recovery import assert_exact

from supervise.snapshot import AGENT_ENV, TOKEN_ENV, AgentClient, SnapshotError
from supervise.snapshot import protocol as p

pytestmark = pytest.mark.slow

STEPS = 200
# Workers started cold: a spare gets its variables (the token too) after it started, so they
# are not in its /proc/<pid>/environ, where this test steals them from.
COLD = FAST_POLICY.replace('preload = ["json"]', "preload = []")
FORGED = 2000  # the version a stranger tries to commit


def environ(pid: int) -> dict[str, str]:
    """A process's environment, as any process of the same user can read it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(x.split("=", 1) for x in raw.decode().split("\0") if "=" in x)


def test_a_local_process_acts_only_for_the_rank_of_its_token(tmp_path: Path) -> None:
    with nodes(tmp_path, 2, steps=STEPS, policy=COLD) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("replicas", lambda: len(c.events(0, "replica stored")) >= 2)
        worker0, worker1 = environ(c.worker_pid(0)), environ(c.worker_pid(1))
        endpoint = worker0[AGENT_ENV]  # node 0's agent serves rank 0
        stolen0, stolen1 = worker0[TOKEN_ENV], worker1[TOKEN_ENV]
        assert stolen0 and stolen1 and stolen0 != stolen1
        for rank, token, why in [
            (0, "", "without a token"),
            (0, "forged", "with a token not issued here"),
            (0, stolen1, "with a token not issued here"),  # rank 1's, issued by node 1
            (1, stolen0, "with the token of rank 0"),
            (4242, stolen0, "with the token of rank 0"),
        ]:
            stranger = AgentClient(endpoint, rank, token=token, timeout=10)
            try:
                stranger.heartbeat(FORGED, {"loss": math.nan})  # a NaN: would roll back
                with pytest.raises(SnapshotError, match=why):
                    stranger.attach(1 << 16, 1 << 16)  # the way to a forged commit
                with pytest.raises(SnapshotError, match=why):
                    stranger.corrupt(1, "forged")  # rank 4242 v1: would restart the cluster
            finally:
                stranger.close()
        # With rank 0's own (stolen) token: a report about a version it does not hold, and
        # bad arguments, are errors too.
        own = AgentClient(endpoint, 0, token=stolen0, timeout=10)
        try:
            with pytest.raises(SnapshotError, match="rank 0 holds no version 1"):
                own.corrupt(1, "forged")
            own._sock.send(msgpack.packb({"op": "restore", "id": 99, "rank": 0, "which": "x"}))
            assert own._sock.poll(10_000)
            reply = p.decode_reply(own._sock.recv())
            assert reply["ok"] is False and "which = 'x'" in reply["error"], reply
        finally:
            own.close()
        # nothing restarted: the one recovery is the crash below, restored from a real version
        c.fault("crash", 1)
        c.wait_resumed(2)
        recoveries = c.recoveries(0)
        assert [r["trigger"] for r in recoveries] == ["worker_exit"], recoveries
        restart = next(e for e in c.events(0, "restart sent") if e["generation"] >= 2)
        assert 0 < restart["step"] < FORGED
        # the old generation's tokens stopped working; the new workers (spares) have theirs
        fresh = environ(c.worker_pid(0, restart["generation"]))[TOKEN_ENV]
        assert fresh and fresh != stolen0
        late = AgentClient(endpoint, 0, token=stolen0, timeout=10)
        try:
            with pytest.raises(SnapshotError, match="with a token not issued here"):
                late.versions()
        finally:
            late.close()
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        assert_exact(c.out, 2, STEPS)
        refused = [e for e in c.events(0) if "refused a local request" in str(e.get("event"))]
        assert refused, "the refusals are logged"
