"""A follower's restarts with ``--store``: taken from the decision the store holds under the
current leader's fence, never from a message alone. The coordinator's restart message is a
nudge (read the store now); a decision is acted on even if no message arrives, and a message
the store does not back is refused."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog
import trio

from supervise.agents import messages as m
from supervise.agents.decision import Decision
from supervise.agents.seat import StoreSeat
from supervise.store import StoreUnavailable

log = structlog.get_logger("supervise.agents.follower")

#: Waits between reads of a claim while the store does not answer (None: give up).
_CHECK_RETRIES: tuple[float | None, ...] = (0.2, 0.5, 1.0, None)

#: Begins a restart: (restart, trace carrier, the leader awaiting its progress).
Act = Callable[[m.Restart, Mapping[str, str], int], None]


class DecisionFollower:
    """Acts once on each store decision that names this node and the generation it was
    prepared for (``prepared``: the last Prepare it answered), whichever of the store's watch
    and the coordinator's message brings it first."""

    def __init__(self, rank: int, seat: StoreSeat, act: Act, prepared: Callable[[], int]) -> None:
        self.rank = rank
        self._seat = seat
        self._act = act
        self._prepared = prepared
        self._acted: set[tuple[int, int, int]] = set()  # (term, generation, attempt)

    def on_store(self, decision: Decision, *, via: str = "watch") -> bool:
        """A decision read from the store under the current leader's fence; whether this
        node restarts by it (now, or already did)."""
        if decision.leader == self.rank or self.rank not in decision.nodes:
            return False  # the leader's own node restarts from its coordinator directly
        key = (decision.term, decision.generation, decision.attempt)
        if key in self._acted:
            return True
        if decision.generation != self._prepared():
            log.debug(
                "store decision not for this node's prepared generation",
                generation=decision.generation,
                prepared=self._prepared(),
            )
            return False
        self._acted.add(key)
        log.info(
            "restart taken from the store",
            generation=decision.generation,
            attempt=decision.attempt,
            step=decision.step,
            port=decision.port,
            leader=decision.leader,
            term=decision.term,
            via=via,
        )
        try:
            self._act(decision.restart_for(self.rank), decision.trace, decision.leader)
        except ValueError as exc:  # a newer generation began meanwhile
            log.warning("store decision outdated", error=str(exc))
        return True

    async def backs_prepare(self, generation: int, sender: int | None) -> bool:
        """Whether the store holds ``sender``'s claim of ``generation`` under its current
        fence: a Prepare (stop the workers) that it does not back goes unanswered (the
        sender's attempt fails) and stops nothing."""
        claim = None
        for delay in _CHECK_RETRIES:
            try:
                claim = await self._seat.read_claim()
                break
            except StoreUnavailable as exc:
                if delay is None:
                    log.warning(
                        "prepare not checked: store unreachable; refused",
                        generation=generation,
                        error=str(exc),
                    )
                    return False
                await trio.sleep(delay)
        if claim is None or claim.leader != sender or claim.generation != generation:
            log.warning(
                "prepare refused: no matching claim in the store",
                generation=generation,
                sender=sender,
                store=None if claim is None else (claim.generation, claim.leader),
            )
            return False
        return True

    async def nudge(self, restart: m.Restart, sender: int | None) -> None:
        """The coordinator's restart message: act on the store's decision if it backs the
        message (same generation, attempt, step and port, written by ``sender`` in its
        current term); otherwise refuse it (said once per message)."""
        try:
            decision = await self._seat.read_decision()
        except StoreUnavailable as exc:
            log.warning(
                "restart message not checked: store unreachable; waiting for its decision",
                generation=restart.generation,
                error=str(exc),
            )
            return
        if decision is None or decision.leader != sender or not decision.matches(restart):
            log.warning(
                "restart message refused: no matching decision in the store",
                generation=restart.generation,
                attempt=restart.attempt,
                sender=sender,
                store=None if decision is None else (decision.generation, decision.attempt),
            )
            return
        self.on_store(decision, via="message")
