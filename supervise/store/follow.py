"""A prefix watch that survives compaction: on `Compacted` it re-reads the prefix, hands the
caller a `Resync` (the state to rebuild from), and resumes watching right after it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self

import attrs
import structlog

from supervise.store.base import Store
from supervise.store.errors import Compacted
from supervise.store.records import Event, Snapshot

log = structlog.get_logger("supervise.store")


@attrs.frozen(slots=True)
class Resync:
    """History was compacted away: ``snapshot`` is the whole current state under the key;
    events follow from ``snapshot.revision + 1``."""

    snapshot: Snapshot
    compact_revision: int


Change = tuple[Event, ...] | Resync


class Follow:
    """``async with Follow(store, prefix, start_revision=rev) as changes: async for c in
    changes`` — each change is a batch of events, or a `Resync` after a compaction."""

    def __init__(
        self, store: Store, key: str, *, prefix: bool = True, start_revision: int = 0
    ) -> None:
        self._store = store
        self._key = key
        self._prefix = prefix
        self._next = start_revision
        self._stack: AsyncExitStack | None = None
        self._batches: AsyncIterator[tuple[Event, ...]] | None = None
        self._pending: Resync | None = None

    @property
    def next_revision(self) -> int:
        """The revision the watch resumes from (0 before the first event of a "from now")."""
        return self._next

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Change:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            return pending
        assert self._batches is not None, "use Follow as an async context manager"
        try:
            batch = await anext(self._batches)
        except Compacted as exc:
            return await self._resync(exc)
        self._next = batch[-1].revision + 1
        return batch

    async def _open(self) -> None:
        try:
            await self._watch(self._next)
        except Compacted as exc:
            self._pending = await self._resync(exc)

    async def _watch(self, start: int) -> None:
        stack = AsyncExitStack()
        try:
            batches = await stack.enter_async_context(
                self._store.watch(self._key, prefix=self._prefix, start_revision=start)
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self._batches = stack, batches

    async def _resync(self, exc: Compacted) -> Resync:
        await self._close()
        snapshot = await self._store.range(self._key, prefix=self._prefix)
        log.warning(
            "store_watch_resync",
            key=self._key,
            wanted=exc.start_revision,
            compacted_to=exc.compact_revision,
            resumed_at=snapshot.revision + 1,
        )
        self._next = snapshot.revision + 1
        await self._watch(self._next)
        return Resync(snapshot, exc.compact_revision)

    async def _close(self) -> None:
        stack, self._stack, self._batches = self._stack, None, None
        if stack is not None:
            await stack.aclose()
