"""The farm's task table in the coordination store (``--store etcd://...``): each task's
record under ``/supervise/<job>/farm/tasks/<id>``, written fenced on the coordinator's
leadership, so a deposed coordinator (frozen, cut off) changes nothing and the next elected
one reads the whole queue back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from supervise.agents.seat import StoreSeat

TASKS: Final = "farm/tasks/"
_PER_TXN: Final = 64  # etcd refuses transactions of more than 128 operations by default


class FarmStoreTable:
    """`supervise.tasks.control.Durable` over the node's `StoreSeat`."""

    def __init__(self, seat: StoreSeat) -> None:
        self.seat = seat

    async def save(self, records: Sequence[tuple[str, bytes]]) -> None:
        """Write the records fenced; FencedWriteRefused / LookupError when this node no
        longer leads (the control plane then steps down)."""
        for i in range(0, len(records), _PER_TXN):
            chunk = records[i : i + _PER_TXN]
            await self.seat.write_fenced([(TASKS + task_id, data) for task_id, data in chunk])

    async def load(self) -> list[bytes]:
        """Every task record in the store."""
        return await self.seat.read_prefix(TASKS)
