"""A scripted farm coordinator for the farm node tests (virtual time and real processes):
it accepts offers, renews the current fences, and records updates of the current fence only
(the others are refused as stale, as the real one does)."""

from __future__ import annotations

from typing import Any

import attrs

from supervise.tasks.farm_messages import (
    STALE_FENCE,
    Ack,
    AttemptPhase,
    Offer,
    Renew,
    Renewed,
    Update,
)


class FakeCoordinator:
    """Accepts offers, renews current fences, records updates of the current fence only."""

    def __init__(self, link: Any) -> None:
        self.fences: dict[str, int] = {}
        self.updates: list[Update] = []
        self.refused: list[Update] = []
        self.offers: list[Offer] = []
        self.renewals: list[Renew] = []
        link.handle(Offer, self._offer)
        link.handle(Update, self._update)
        link.handle(Renew, self._renew)

    async def _offer(self, msg: Any) -> Ack:
        self.offers.append(msg.body)
        return Ack(True)

    async def _update(self, msg: Any) -> Ack:
        u: Update = msg.body
        if u.result is None and u.phase is AttemptPhase.COMPLETED and msg.buffers:
            u = attrs.evolve(u, result=bytes(msg.buffers[0]))  # a large result: the payload
        if u.fence != self.fences.get(u.task_id):
            self.refused.append(u)
            return Ack(False, STALE_FENCE)
        self.updates.append(u)
        return Ack(True)

    async def _renew(self, msg: Any) -> Renewed:
        r: Renew = msg.body
        self.renewals.append(r)
        return Renewed(stale=[t for t, f in r.held if f != self.fences.get(t)])

    def phases(self, task_id: str) -> list[tuple[int, AttemptPhase]]:
        return [(u.node, u.phase) for u in self.updates if u.task_id == task_id]

    def completed(self, task_id: str) -> list[Update]:
        return [
            u for u in self.updates if u.task_id == task_id and u.phase is AttemptPhase.COMPLETED
        ]
