"""`JournalHost`: task journals in this process's RAM, served to worker processes.

It plays the node agent's part for tasks run on one machine: an `ArenaService` (shared-memory
arenas, double-buffered, checksummed) answering the snapshot protocol on a local endpoint.
A worker writes its journal through `AgentClient` (``SUPERVISE_AGENT``) with the token `token`
issued for its shard and attempt (``SUPERVISE_AGENT_TOKEN``): no other process of the user, nor
an earlier attempt's worker left behind, writes that journal. A kill -9 of the worker loses
nothing that was committed, since the arena belongs to this process. On a farm
the node agent hosts the journals instead and replicates them to its group peers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from supervise._validation import InvalidValue
from supervise.cluster.ipc import ipc_endpoint, serve_requests
from supervise.snapshot.budget import MemoryBudget, total_ram
from supervise.snapshot.client import LocalOwner
from supervise.snapshot.retention import RetentionRule
from supervise.snapshot.service import ArenaService
from supervise.snapshot.tokens import RankTokens
from supervise.tasks.arena_journal import ArenaJournal


class JournalHost:
    """An arena service for task journals and the endpoint workers reach it on."""

    def __init__(self, service: ArenaService, endpoint: str) -> None:
        if service.tokens is None:
            raise ValueError("a JournalHost's service must check tokens (tokens=RankTokens())")
        self.service = service
        self.endpoint = endpoint
        self._tokens = service.tokens

    def token(self, shard: int, attempt: int) -> str:
        """A fresh credential for the worker of ``shard``'s attempt ``attempt``: the endpoint
        serves it for that shard only, and the shard's previous token stops working."""
        return self._tokens.issue(shard, attempt)

    def journal(self, shard: int, generation: int = 0) -> ArenaJournal:
        """The journal of ``shard``, read (and written, as ``generation``) in this process —
        only while no worker writes it (e.g. the outcome, after the worker ended its attempt):
        greeting the shard frees the slots a previous writer left half-written."""
        return ArenaJournal(LocalOwner(self.service, shard), generation=generation)


@asynccontextmanager
async def open_journal_host(
    shm_dir: str | os.PathLike[str] = "/dev/shm", *, budget: float = 0.25
) -> AsyncIterator[JournalHost]:
    """Serve task journals from arenas in ``shm_dir`` (at most ``budget`` of RAM) until the
    block ends; the arenas are gone then."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise InvalidValue("budget", budget, "must be a fraction of RAM in (0, 1]")
    sock_dir = Path(tempfile.mkdtemp(prefix="sv-tasks-"))
    service = ArenaService(
        shm_dir,
        rule=RetentionRule(keep_last=1),
        budget=MemoryBudget(int(total_ram() * budget), source="task journal budget"),
        node=f"tasks-{os.getpid()}",  # arena files workers open by name; removed at the end
        adopt=False,
        tokens=RankTokens(),  # a worker writes its own task's journal only
    )
    try:
        async with trio.open_nursery() as nursery:
            endpoint = await nursery.start(
                serve_requests, ipc_endpoint(sock_dir, "journals"), service.handle
            )
            try:
                yield JournalHost(service, endpoint)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        service.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
