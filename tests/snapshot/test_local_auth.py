"""The agent's local endpoint serves a worker for the rank of its token only; reports about
versions it does not hold and bad arguments are errors; snapshot files and the agent's
directories are private to their owner whatever the umask."""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from snaphelp import ThreadedAgent, make_service
from test_persist import shard
from test_service import commit_version, hello

from supervise.agents.rundir import NodeLock, claim_run_dir
from supervise.agents.workers import Launch, Spare
from supervise.cluster.keys import generate_keys
from supervise.snapshot import (
    TOKEN_ENV,
    AgentClient,
    PersistTier,
    RankTokens,
    Refusal,
    SnapshotError,
)
from supervise.snapshot import protocol as p
from supervise.snapshot.service import FRESH, ArenaService


@contextlib.contextmanager
def served(tmp_path: Path) -> Iterator[tuple[ArenaService, RankTokens, str, list[Any]]]:
    """An ArenaService that checks tokens, behind zmq; the corrupt and heartbeat hooks' calls."""
    svc = make_service(tmp_path / "shm", keep_last=2)
    svc.tokens = tokens = RankTokens()
    heard: list[Any] = []
    svc.add_corrupt_hook(lambda *a: heard.append(("corrupt", *a)))
    svc.add_heartbeat_hook(lambda rank, step, m: heard.append(("beat", rank, step, dict(m))))
    agent = ThreadedAgent(svc, f"ipc://{tmp_path}/agent.sock")
    try:
        yield svc, tokens, agent.endpoint, heard
    finally:
        agent.close()
        svc.close()


CALLS: list[tuple[Any, ...]] = [
    ("attach", 1 << 10, 1 << 16),
    ("begin",),
    ("corrupt", 5, "forged"),
    ("corrupt", 1, "forged"),
    ("restore", "latest"),
    ("restored", 5),
    ("versions",),
]


def test_a_worker_acts_only_for_the_rank_of_its_token(tmp_path: Path) -> None:
    with served(tmp_path) as (svc, tokens, endpoint, heard):
        token0 = tokens.issue(0, 1)
        token1 = tokens.issue(1, 1)
        own = AgentClient(endpoint, 0, token=token0, timeout=5)
        own.hello(hello(0))
        commit_version(own, 5)
        slot = own.begin()  # the worker writes its next capture here...
        assert slot is not None
        refused = 0
        for rank, token, why in [
            (0, "", "without a token"),
            (0, "forged", "with a token not issued here"),
            (0, token1, "with the token of rank 1"),
            (1, token0, "with the token of rank 0"),
            (4242, token0, "with the token of rank 0"),
        ]:
            stranger = AgentClient(endpoint, rank, token=token, timeout=5)
            try:
                stranger.heartbeat(6, {"loss": math.nan})  # dropped (a heartbeat has no reply)
                for name, *args in CALLS:
                    with pytest.raises(SnapshotError, match=why):
                        getattr(stranger, name)(*args)
                    refused += 1
                with pytest.raises(SnapshotError, match=why):  # ...a stranger commits it
                    stranger.commit(slot, shard(2000, rank=rank)[0].to_bytes())
                refused += 1
            finally:
                stranger.close()
        own.abort(slot)
        # nothing was dropped, committed or reported; every refusal was counted
        assert [v.step for v in own.versions()] == [5]
        assert svc.versions(1) == [] and svc.versions(4242) == []
        assert heard == []
        assert svc.refused[Refusal.UNAUTHORIZED] == refused + 5  # and the five heartbeats
        own.heartbeat(6, {"loss": 0.5})
        assert [v.step for v in own.versions()] == [5]
        assert heard == [("beat", 0, 6, {"loss": 0.5})]
        # a new generation's token replaces the old one
        tokens.issue(0, 2)
        with pytest.raises(SnapshotError, match="with a token not issued here"):
            own.versions()
        own.close()


def test_a_report_about_a_version_not_held_is_refused(tmp_path: Path) -> None:
    with served(tmp_path) as (_svc, tokens, endpoint, heard):
        own = AgentClient(endpoint, 0, token=tokens.issue(0, 0), timeout=5)
        try:
            commit_version(own, 5)
            with pytest.raises(SnapshotError, match="rank 0 holds no version 1: nothing to drop"):
                own.corrupt(1, "forged")
            assert heard == [] and [v.step for v in own.versions()] == [5]
            own.corrupt(5, "checksum mismatch")  # a real one still is dropped and reported
            assert heard == [("corrupt", 0, 5, "checksum mismatch")] and own.versions() == []
        finally:
            own.close()


def raw_request(op: str, **fields: Any) -> bytes:
    return bytes(msgpack.packb({"op": op, "id": 7, **fields}, use_bin_type=True))


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    svc.set_restore_target(0, FRESH)  # a target used to hide a bad `which`: [] came back
    for frame, message in [
        (raw_request("restore", rank=0, which="garbage"), "which = 'garbage'"),
        (raw_request("restore", rank=0, which=-1), "which = -1"),
        (raw_request("versions", rank=2**63 - 1), "rank = 9223372036854775807"),
        (raw_request("versions", rank=-5), "rank = -5"),
        (raw_request("corrupt", rank=0, step=-1, reason="x"), "step = -1"),
        (raw_request("restored", rank=0, step=-3), "step = -3"),
        (raw_request("attach", rank=0, nbytes=-1, manifest_capacity=0), "nbytes = -1"),
        (
            raw_request("hello", rank=2, local_rank=0, world_size=2, generation=0, pid=1),
            "rank 2 (local rank 0) must be below the world size 2",
        ),
        (
            raw_request("commit", rank=0, arena="a", slot=0, manifest=b"", source="peer"),
            "source = 'peer'",
        ),
    ]:
        reply = p.decode_reply(svc.handle(frame) or b"")
        assert reply["ok"] is False and message in reply["error"], reply
    svc.handle(raw_request("heartbeat", rank=0, step=-1, metrics={}))
    assert svc.refused[Refusal.MALFORMED] == 10
    with pytest.raises(ValueError, match="which = 'garbage'"):
        p.Restore(0, "garbage")
    svc.close()


def test_the_token_travels_in_the_workers_environment() -> None:
    launch = Launch(("python",), 1, 2, 2, 0, "127.0.0.1", 1, "ipc:///x", tokens={2: "t2"})
    assert launch.environment(0)[TOKEN_ENV] == "t2"
    assert TOKEN_ENV not in launch.environment(1)  # no token issued for rank 3
    assert "t2" not in repr(launch)  # a secret: not in a log line or an error


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class _Handle:
    label = ""


async def test_files_and_directories_are_private_under_umask_0(tmp_path: Path) -> None:
    # async: a Spare notes its spawn time on the trio clock
    old = os.umask(0)
    try:
        m, data = shard(3)
        tier = PersistTier(tmp_path / "ckpt" / "deep", rank=0, keep=2, job="job")
        written = tier.write(m, memoryview(data))
        marker = tier.mark_finished()
        svc = make_service(tmp_path / "shm" / "node")
        arena = svc.attach(0, 1 << 10)
        run_dir = claim_run_dir(0, base=tmp_path)
        lock = NodeLock(tmp_path / "locks", "node0")
        go = run_dir / "spare.go"
        Spare(_Handle(), go).wake({TOKEN_ENV: "secret"}, "worker")  # type: ignore[arg-type]
        keys = generate_keys(tmp_path / "keys" / "job", 1, clients=())
        try:
            for d in (tmp_path / "ckpt", tmp_path / "ckpt" / "deep", tier.path):
                assert mode(d) == 0o700, d
            for d in (tmp_path / "shm", tmp_path / "shm" / "node", run_dir, lock.path.parent):
                assert mode(d) == 0o700, d
            for d in (tmp_path / "keys", tmp_path / "keys" / "job"):  # no stranger adds a key
                assert mode(d) == 0o700, d
            assert sorted(mode(k) for k in keys) == [0o600, 0o644]  # the secret, the public
            assert marker is not None
            for f in (written, marker, arena.path, run_dir / "owner", lock.path, go):
                assert mode(f) == 0o600, f
        finally:
            lock.release()
            svc.close()
    finally:
        os.umask(old)
