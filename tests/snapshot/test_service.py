import logging
import os
from pathlib import Path

import msgpack
import pytest
from snaphelp import ThreadedAgent, make_service
from test_persist import shard

from supervise.snapshot import (
    AgentClient,
    CapacityError,
    CorruptSnapshot,
    Manifest,
    SnapshotError,
)
from supervise.snapshot import protocol as p
from supervise.snapshot.client import LocalOwner
from supervise.snapshot.service import FRESH


def hello(rank: int = 0) -> p.Hello:
    return p.Hello(rank=rank, local_rank=0, world_size=2, generation=0, pid=123)


def commit_version(owner: LocalOwner | AgentClient, step: int) -> tuple[Manifest, bytearray]:
    m, data = shard(step, rank=owner.rank)
    owner.attach(m.nbytes, 1 << 16)
    slot = owner.begin()
    assert slot is not None
    slot.arena.data(slot.slot, m.nbytes)[:] = data
    owner.commit(slot, m.to_bytes())
    return m, data


def test_double_buffer_retention_and_restore_candidates(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=1)
    owner = LocalOwner(svc, 0)
    owner.hello(hello())
    for s in (2, 4, 6):
        commit_version(owner, s)
    assert [v.step for v in owner.versions()] == [6]
    [cand] = owner.restore("latest")
    assert cand.info.step == 6 and cand.manifest.step == 6
    svc.close()


def test_recapture_of_same_step_replaces_it(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=3)
    owner = LocalOwner(svc, 0)
    commit_version(owner, 4)
    commit_version(owner, 4)
    assert [v.step for v in owner.versions()] == [4]
    svc.close()


def test_pinned_slot_is_not_reused(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=1)
    owner = LocalOwner(svc, 0)
    _m, data = commit_version(owner, 1)
    with svc.shard(0, 1) as sh:
        assert bytes(sh.data) == bytes(data)
        commit_version(owner, 2)  # evicts 1 but its slot stays pinned
        assert owner.begin() is None  # the only other slot holds version 2
        assert bytes(sh.data) == bytes(data)
    assert owner.begin() is not None
    svc.close()


def test_restore_target_overrides_which_and_is_used_up(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=3)
    owner = LocalOwner(svc, 0)
    for s in (1, 2, 3):
        commit_version(owner, s)
    svc.set_restore_target(0, 2)
    # The cluster restores exactly the target: no per-rank fallback to an older version.
    assert [c.info.step for c in owner.restore("latest")] == [2]
    owner.restored(2)
    # the timeline is at 2 now: 3 is a rolled-back future, not "latest"
    assert [c.info.step for c in owner.restore("latest")] == [2, 1]
    commit_version(owner, 3)
    assert [v.step for v in owner.versions()] == [1, 2, 3]
    svc.close()


def test_restore_target_is_strict(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=2)
    owner = LocalOwner(svc, 0)
    commit_version(owner, 1)
    svc.set_restore_target(0, FRESH)
    assert owner.restore("latest") == []  # a fresh start, whatever is held
    svc.set_restore_target(0, 7)
    with pytest.raises(SnapshotError, match="restore target, version 7, is not held"):
        owner.restore("latest")
    svc.close()


def test_request_hook_sees_every_decoded_request(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=1)
    seen: list[object] = []
    svc.add_request_hook(seen.append)
    svc.handle(p.encode_request(p.Heartbeat(0, 5, {"loss": 1.0}), 1))
    assert [type(r).__name__ for r in seen] == ["Heartbeat"]
    svc.close()


def test_corrupt_report_drops_the_version_and_calls_hooks(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=2)
    seen = []
    svc.add_corrupt_hook(lambda r, s, why: seen.append((r, s, why)))
    owner = LocalOwner(svc, 0)
    commit_version(owner, 1)
    commit_version(owner, 2)
    owner.corrupt(2, "checksum mismatch in 'w'")
    assert [v.step for v in owner.versions()] == [1]
    assert seen == [(0, 2, "checksum mismatch in 'w'")]
    svc.close()


def test_commit_hooks_and_heartbeats(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    commits, beats = [], []
    svc.add_commit_hook(lambda e: commits.append((e.rank, e.info.step)))
    svc.add_heartbeat_hook(lambda r, s, m: beats.append((r, s, dict(m))))
    owner = LocalOwner(svc, 0)
    commit_version(owner, 5)
    owner.heartbeat(6, {"loss": 0.5})
    assert commits == [(0, 5)]
    assert beats == [(0, 6, {"loss": 0.5})]
    assert svc.last_heartbeat(0) is not None
    svc.close()


def test_agent_restart_adopts_committed_versions(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=2, node="n7")
    owner = LocalOwner(svc, 1)
    _, _data1 = commit_version(owner, 1)
    _, data2 = commit_version(owner, 2)
    half = owner.begin()  # a capture in flight when the agent dies
    assert half is not None
    svc.close(unlink=False)  # the agent process dies; the files stay in shared memory
    again = make_service(tmp_path, keep_last=2, node="n7")
    assert [v.step for v in again.versions(1)] == [1, 2]
    with again.shard(1, 2) as sh:
        assert bytes(sh.data) == bytes(data2)
    assert again.budget.held > 0
    other_node = make_service(tmp_path, node="n8")
    assert other_node.versions(1) == []
    again.close()
    assert list(tmp_path.glob("*.arena")) == []


def test_truncated_arena_is_not_adopted_and_offers_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc = make_service(tmp_path, keep_last=2, node="n7")
    for rank in (0, 1):
        owner = LocalOwner(svc, rank)
        commit_version(owner, 1)
        commit_version(owner, 2)
    svc.close(unlink=False)  # the agent dies; its arenas stay in shared memory
    [cut] = tmp_path.glob("supervise-n7-r00001-*.arena")
    os.truncate(cut, cut.stat().st_size - 4096)
    with caplog.at_level(logging.WARNING):
        again = make_service(tmp_path, keep_last=2, node="n7")
    assert f"removing unreadable arena {cut}" in caplog.text and "truncated" in caplog.text
    assert not cut.exists()  # a half-made arena is removed when its node adopts
    assert again.versions(1) == []  # nothing of it is offered: a restart looks elsewhere
    assert [v.step for v in again.versions(0)] == [1, 2]
    again.close()


def test_ingest_verifies_before_commit(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    m, data = shard(9)
    info = svc.ingest(0, m, lambda view: view.__setitem__(slice(None), data), source="peer")
    assert info.source == "peer" and [v.step for v in svc.versions(0)] == [9]
    bad = bytearray(data)
    bad[0] ^= 1
    with pytest.raises(CorruptSnapshot, match="fails its checksum"):
        svc.ingest(0, shard(11)[0], lambda view: view.__setitem__(slice(None), bad))
    assert [v.step for v in svc.versions(0)] == [9]
    svc.close()


def test_budget_is_checked_before_allocating(tmp_path: Path) -> None:
    svc = make_service(tmp_path, budget=64 << 10)
    with pytest.raises(CapacityError, match="RAM budget"):
        svc.attach(0, 1 << 20)
    assert list(tmp_path.iterdir()) == []
    svc.close()


def test_layout_growth_gets_a_new_arena_and_old_one_goes_when_unused(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=1)
    owner = LocalOwner(svc, 0)
    commit_version(owner, 1)
    small = svc.attach(0, 100)
    big = svc.attach(0, 1 << 20)
    assert big is not small and len(list(tmp_path.glob("*.arena"))) == 2
    slot = owner.begin()
    assert slot is not None and slot.arena is big
    m, data = shard(2)
    big.data(slot.slot, m.nbytes)[:] = data
    owner.commit(slot, m.to_bytes())
    assert len(list(tmp_path.glob("*.arena"))) == 1
    svc.close()


def test_wire_errors_are_one_line_replies(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    for frame, message in [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"op": "nope", "id": 1}), "unknown op 'nope'"),
        (msgpack.packb({"op": "begin", "id": 1}), "missing field 'rank'"),
        (msgpack.packb({"op": "begin", "id": 1, "rank": "0"}), "expected int"),
        (msgpack.packb({"op": "begin", "id": 1, "rank": 0, "x": 1}), "unknown field"),
        (msgpack.packb({"op": "begin", "id": 2, "rank": 0}), "no arena: attach first"),
        (msgpack.packb({"op": "pause", "id": 4, "rank": 0, "paused": 1}), "expected true or"),
        (
            msgpack.packb(
                {"op": "commit", "id": 3, "rank": 0, "arena": "a", "slot": 0, "manifest": b""}
            ),
            "did not begin",
        ),
    ]:
        reply = p.decode_reply(svc.handle(frame) or b"")
        assert reply["ok"] is False
        assert message in reply["error"] and "\n" not in reply["error"]
    assert svc.handle(p.encode_request(p.Heartbeat(0, 1, {"loss": 1.0}), 0)) is None
    svc.close()


def test_agent_client_over_zmq(tmp_path: Path) -> None:
    svc = make_service(tmp_path / "shm", keep_last=2)
    svc.policy = {"snapshot": {"every_steps": 5}}
    agent = ThreadedAgent(svc, f"ipc://{tmp_path}/agent.sock")
    client = AgentClient(agent.endpoint, 0, timeout=5)
    pauses: list[tuple[int, bool]] = []
    svc.add_pause_hook(lambda rank, paused: pauses.append((rank, paused)))
    try:
        greeting = client.hello(hello())
        assert greeting.policy == {"snapshot": {"every_steps": 5}}
        m, data = commit_version(client, 3)
        client.heartbeat(4, {"loss": 0.1})
        client.pause(True)  # answered: the agent knows before the long phase runs
        assert pauses == [(0, True)]
        client.pause(False)
        assert pauses == [(0, True), (0, False)]
        [cand] = client.restore("latest")
        assert cand.manifest == m
        assert bytes(cand.slot.arena.data(cand.slot.slot, m.nbytes)) == bytes(data)
        assert [v.step for v in client.versions()] == [3]
        with pytest.raises(SnapshotError, match="agent refused 'commit'"):
            client.commit(cand.slot, m.to_bytes())
    finally:
        client.close()
        agent.close()
        svc.close()


def test_agent_client_times_out_clearly(tmp_path: Path) -> None:
    client = AgentClient(f"ipc://{tmp_path}/nobody.sock", 0, timeout=0.2)
    with pytest.raises(SnapshotError, match=r"did not answer 'versions' within 0.2 s"):
        client.versions()
    client.heartbeat(1, {})  # never blocks, never raises
    client.close()
    with pytest.raises(SnapshotError, match="not a zmq endpoint"):
        AgentClient("localhost:1234", 0)


def test_a_pinned_version_outlives_keep_last_until_unpinned(tmp_path: Path) -> None:
    # keep_last = 1 (Gemini's policy) and snapshots every step: without the pin, the version
    # the peers' replicas hold is evicted by the next commit, and a lost node has nothing.
    svc = make_service(tmp_path, keep_last=1, pinned_slots=2)
    owner = LocalOwner(svc, 0)
    owner.hello(hello())
    commit_version(owner, 1)
    svc.pin(0, {1, 3})  # the recoverable point (1) and the target (3, not committed yet)
    for s in range(2, 6):
        commit_version(owner, s)  # every commit still finds a free slot
    assert [v.step for v in owner.versions()] == [1, 3, 5]
    assert svc.pinned(0) == {1, 3}
    svc.pin(0, {3, 7})  # 3 became the point: 1 goes
    assert [v.step for v in owner.versions()] == [3, 5]
    svc.close()


def test_pinned_slots_make_room_for_the_point_and_the_target(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=1, pinned_slots=2)
    owner = LocalOwner(svc, 0)
    commit_version(owner, 1)
    assert svc.arena(next(iter(svc._arenas))).n_slots == 4  # 1 kept + 1 to write + 2 pinned
    with pytest.raises(ValueError, match="pinned_slots = -1"):
        make_service(tmp_path / "x", pinned_slots=-1)
    svc.close()


def test_release_forgets_a_rank_and_gives_its_arenas_back_unless_in_use(tmp_path: Path) -> None:
    svc = make_service(tmp_path, keep_last=1)
    owner = LocalOwner(svc, 1)
    owner.hello(hello(1))
    commit_version(owner, 2)
    held = svc.budget.held
    files = sorted(tmp_path.glob("*.arena"))
    assert held > 0 and files
    with svc.shard(1, 2):
        assert not svc.release(1)  # a reader holds a slot: nothing changes
    assert svc.versions(1)
    slot = owner.begin()
    assert not svc.release(1)  # a slot being written
    assert slot is not None
    owner.abort(slot)
    assert svc.release(1)
    assert svc.versions(1) == [] and 1 not in svc.ranks
    assert svc.budget.held == 0
    assert not any(f.exists() for f in files)
    assert svc.release(1)  # unknown: nothing to do


def test_a_rank_released_and_used_again_gets_fresh_arena_names_without_end(
    tmp_path: Path,
) -> None:
    """A farm node gives a finished task's shard to the next task: the rank's arena names
    keep counting (a worker may still map an old one by name), with no cap on how often."""
    svc = make_service(tmp_path, keep_last=1)
    names = []
    for i in range(3):
        if i == 1:
            svc._next_name[1] = 9_999  # the rank's ten-thousandth arena comes next
        owner = LocalOwner(svc, 1)
        owner.hello(hello(1))
        commit_version(owner, 2)
        names.append(sorted(p.name for p in tmp_path.glob("*.arena")))
        assert svc.release(1)
    assert len({n for ns in names for n in ns}) == 3  # never the same name twice
    assert any("-10000.arena" in n for n in names[2])
    # an agent started again adopts such a name too (as its arena, not another node's)
    from supervise.snapshot.service import _ARENA_NAME

    m = _ARENA_NAME.match(names[2][0])
    assert m is not None and (m.group("rank"), m.group("n")) == ("00001", "10000")
    svc.close()
