"""Keep-alive as a supervised child (virtual time): a lost lease is a loud, abnormal exit, also
when the store is unreachable for a whole TTL; a short outage is survived."""

from __future__ import annotations

import pytest
import structlog
import trio
import trio.testing

import supervise.runtime as sv
from supervise.store import EmbeddedStore, LeaseLost, StoreUnavailable, keep_alive


class _Flaky(EmbeddedStore):
    """An embedded store whose keep-alive fails while ``down`` (an unreachable etcd)."""

    down = False

    async def keepalive(self, lease: int) -> int:
        if self.down:
            raise StoreUnavailable("lease keepalive", "connection refused")
        return await super().keepalive(lease)


async def test_a_revoked_lease_is_an_abnormal_child_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = EmbeddedStore()
    lease = await store.grant(3)
    sup = sv.Supervisor(
        [sv.child(keep_alive, store, lease, 3, id="lease", restart=sv.Restart.TRANSIENT)],
        max_restarts=0,
    )
    with structlog.testing.capture_logs() as logs, pytest.RaisesGroup(sv.GaveUp):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(10)  # renewed all along
            assert await store.keepalive(lease) == 3
            await store.revoke(lease)
            await trio.sleep_forever()
    exits = [e for e in logs if e["event"] == "child_exited"]
    assert exits and exits[0]["reason"] == "abnormal" and "LeaseLost" in exits[0]["error"]
    assert any(e["event"] == "store_lease_lost" and e["log_level"] == "error" for e in logs)


async def test_an_outage_shorter_than_the_ttl_is_survived_a_longer_one_is_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = _Flaky()
    lease = await store.grant(3)
    with structlog.testing.capture_logs() as logs, pytest.RaisesGroup(LeaseLost) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_alive, store, lease, 3)
            store.down = True
            await trio.sleep(1.5)  # one renewal fails: warned once, the lease lives on
            store.down = False
            await trio.sleep(5)
            assert await store.keepalive(lease) == 3
            started = trio.current_time()
            store.down = True
            await trio.sleep_forever()
    assert trio.current_time() - started <= 3  # given up within a TTL (virtual time)
    assert "no renewal got through" in caught.value.exceptions[0].why
    events = [e["event"] for e in logs]
    assert events.count("store_lease_renewal_failed") == 2  # once per outage
    assert events.count("store_lease_renewed") == 1
    assert events[-1] == "store_lease_lost"
