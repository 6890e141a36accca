"""Holding a lease: renew it a few times per TTL as a supervised child, and fail loudly
(`LeaseLost`, an error log line) the moment the store says it is gone, or when no renewal got
through for a whole TTL (then it has expired in the store, whether or not we can see it)."""

from __future__ import annotations

from typing import Final, NoReturn

import structlog
import trio

from supervise.store.base import Store
from supervise.store.errors import LeaseLost, StoreUnavailable

log = structlog.get_logger("supervise.store")

#: Renewals per TTL: one lost or slow renewal still leaves two before the lease expires.
RENEWALS_PER_TTL: Final = 3


async def keep_alive(
    store: Store,
    lease: int,
    ttl_s: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Renew ``lease`` until cancelled; `LeaseLost` when it is gone (a supervised child:
    ``child(keep_alive, store, lease, ttl, id="lease")``)."""
    interval = ttl_s / RENEWALS_PER_TTL
    renewed = trio.current_time()
    warned = False
    task_status.started()
    while True:
        await trio.sleep(interval)
        try:
            ttl = await store.keepalive(lease)
        except StoreUnavailable as exc:
            silent = trio.current_time() - renewed
            if silent >= ttl_s:
                _lost(lease, f"no renewal got through for {silent:.1f} s (TTL {ttl_s} s): {exc}")
            if not warned:
                log.warning("store_lease_renewal_failed", lease=f"{lease:x}", error=str(exc))
                warned = True
            continue
        if ttl <= 0:
            _lost(lease, "expired or revoked in the store")
        if warned:
            log.info("store_lease_renewed", lease=f"{lease:x}", ttl=ttl)
            warned = False
        renewed = trio.current_time()


def _lost(lease: int, why: str) -> NoReturn:
    log.error("store_lease_lost", lease=f"{lease:x}", why=why)
    raise LeaseLost(lease, why)
