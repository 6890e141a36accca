"""The etcd backend beyond the shared contract: a 3-member cluster losing the member the client
talks to, an unreachable etcd, and the gateway's JSON quirks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from supervise._testing.etcd import EtcdCluster
from supervise._testing.procs import free_port, pid_alive
from supervise._testing.tls import TlsError, make_tls_files
from supervise.store import (
    Election,
    EventKind,
    Follow,
    Put,
    Resync,
    StoreUnavailable,
    keep_alive,
    missing,
    open_store,
    parse_store_url,
)
from supervise.store import _gateway as gw
from supervise.store.etcd import EtcdStore

WAIT = 20.0
ETCDLOCAL = Path(__file__).parents[2] / "integrations" / "etcd" / "etcdlocal.py"


async def test_three_members_survive_losing_the_one_in_use(etcd3: EtcdCluster) -> None:
    store = open_store(parse_store_url(etcd3.url))
    assert isinstance(store, EtcdStore)
    try:
        lease = await store.grant(2)
        election = Election(store, "/job/leader")
        won = await election.campaign(lease, b"node-0")
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_alive, store, lease, 2)
            async with Follow(store, "/job/decisions/") as changes:
                in_use = etcd3.endpoints.index(store.endpoint.removeprefix("http://"))
                pid = etcd3.kill(in_use)  # SIGKILL, as a crashed machine
                assert not pid_alive(pid)
                with trio.fail_after(WAIT):
                    # the two left are a majority: writes, the lease and the leadership go on
                    while True:  # as a caller does: back off while a new raft leader is elected
                        try:
                            result = await election.write(won, (Put("/job/decisions/gen", b"2"),))
                            break
                        except StoreUnavailable:
                            await trio.sleep(0.2)
                    change = await anext(changes)  # the watch moved to a live member
                assert store.endpoint != f"http://{etcd3.endpoints[in_use]}"
                assert not isinstance(change, Resync)
                assert [(e.kind, e.record.value, e.revision) for e in change] == [
                    (EventKind.PUT, b"2", result.revision)
                ]
                await trio.sleep(3)  # longer than the TTL: keep-alive renews through the others
                leader = await election.leader()
                assert leader is not None and leader.create_revision == won.revision
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_unreachable_etcd_is_unavailable_in_one_line() -> None:
    dead = [free_port(), free_port()]
    store = open_store(parse_store_url(f"etcd://127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}"))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.range("/x")
        with pytest.raises(StoreUnavailable):
            async with store.watch("/x"):
                pass
    finally:
        await store.aclose()
    message = str(caught.value)
    assert "\n" not in message
    assert f"127.0.0.1:{dead[0]}" in message and f"127.0.0.1:{dead[1]}" in message


def test_gateway_json_quirks() -> None:
    # a PUT event has no "type" (the default), int64 fields are strings, zero fields are absent
    put = gw.event({"kv": {"key": gw.b64(b"/k"), "create_revision": "7", "mod_revision": "9"}})
    assert (put.kind, put.record.key, put.record.value, put.revision) == (
        EventKind.PUT,
        "/k",
        b"",
        9,
    )
    assert (put.record.create_revision, put.record.version, put.record.lease) == (7, 0, 0)
    gone = gw.event({"type": "DELETE", "kv": {"key": gw.b64(b"/k"), "mod_revision": "10"}})
    assert gone.kind is EventKind.DELETE
    assert gw.revision({"header": {"revision": "12345678901234"}}) == 12345678901234
    assert gw.revision({}) == 0
    assert gw.key_range("/p/", prefix=True) == {"key": gw.b64(b"/p/"), "range_end": gw.b64(b"/p0")}
    txn = gw.txn((), (Put("/a", b"\xff", lease=2**62),), ())
    assert txn["success"][0]["request_put"] == {
        "key": gw.b64(b"/a"),
        "value": "/w==",
        "lease": str(2**62),
    }


def test_etcdlocal_starts_reports_and_stops_by_pid(tmp_path: Path, etcd_binary: Path) -> None:
    state = tmp_path / "etcd-state"

    def tool(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(ETCDLOCAL), "--state-dir", str(state), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    started = tool("start")
    assert started.returncode == 0, started.stderr
    pids = json.loads((state / "etcd.json").read_text())["pids"]
    try:
        url = started.stdout.split("--store ", 1)[1].split()[0]
        assert parse_store_url(url).endpoints  # what it prints is a usable --store
        assert tool("status").returncode == 0
        assert tool("start").returncode == 1  # one scratch cluster per state dir
        assert tool("stop").returncode == 0
        assert not [pid for pid in pids if pid_alive(pid)]
        assert tool("status").returncode == 1
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_tls_with_a_client_certificate(tmp_path: Path, etcd_binary: Path) -> None:
    try:
        tls = make_tls_files(tmp_path / "tls")
    except TlsError as exc:
        pytest.skip(str(exc))
    with EtcdCluster(tmp_path / "etcd", binary=etcd_binary, tls=tls) as etcd:
        assert etcd.url.startswith("etcd+https://")
        config = parse_store_url(etcd.url, ca=tls.ca, cert=tls.client_cert, key=tls.client_key)
        store = open_store(config)
        try:
            assert (await store.txn((missing("/tls"),), (Put("/tls", b"ok"),))).succeeded
            record = await store.get("/tls")
            assert record is not None and record.value == b"ok"
        finally:
            await store.aclose()
        anonymous = open_store(parse_store_url(etcd.url, ca=tls.ca))  # no client certificate
        try:
            with pytest.raises(StoreUnavailable):
                await anonymous.get("/tls")
        finally:
            await anonymous.aclose()


async def test_a_frozen_etcd_is_unavailable_until_it_thaws(
    tmp_path: Path, etcd_binary: Path
) -> None:
    with EtcdCluster(tmp_path / "etcd", binary=etcd_binary) as etcd:
        store = open_store(parse_store_url(etcd.url, timeout_s=0.5))
        try:
            await store.put("/k", b"v")
            etcd.kill(0, signal.SIGSTOP)  # slow rather than gone: the request times out
            try:
                with pytest.raises(StoreUnavailable, match="Timeout"):
                    await store.get("/k")
            finally:
                etcd.kill(0, signal.SIGCONT)
            with trio.fail_after(WAIT):
                while True:  # as a caller does: back off, try again
                    try:
                        record = await store.get("/k")
                        break
                    except StoreUnavailable:
                        await trio.sleep(0.2)
            assert record is not None and record.value == b"v"
        finally:
            await store.aclose()
