"""Hot standby agents as a node sees them: who said hello lately, and which lost rank each
takes (`Standbys`). Every node keeps the registry (a standby greets them all), so whichever
node coordinates next knows the same standbys; only the coordinator assigns ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs


@attrs.frozen(slots=True)
class StandbyEntry:
    """One standby agent: ``name`` (its endpoint), ``since`` (its start, wall clock: the
    oldest is chosen first) and when it was last heard (trio clock)."""

    name: str
    endpoint: str
    since: float
    heard: float
    ranks: frozenset[int] | None = None  # the ranks it can take (None: any; CURVE: its keys)

    @property
    def order(self) -> tuple[float, str]:
        """The choice order: the oldest first, the lowest name on a tie."""
        return (self.since, self.name)


class Standbys:
    """The standbys heard within ``timeout`` seconds, and the lost ranks given to them.

    A standby not heard for ``timeout`` is dropped (its rank, if it had one and has not
    joined yet, goes to the next standby); a standby that took a rank leaves the registry
    once that rank is live again: it is a normal node from then on.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._entries: dict[str, StandbyEntry] = {}
        self._assigned: dict[int, str] = {}  # lost rank -> standby name

    def heard(
        self,
        name: str,
        endpoint: str,
        since: float,
        now: float,
        ranks: Iterable[int] | None = None,
    ) -> None:
        """A hello from a standby (a new one, or one heard before); ``ranks``: those it can
        take (None: any)."""
        can = None if ranks is None else frozenset(ranks)
        self._entries[name] = StandbyEntry(name, endpoint, since, now, can)

    def live(self, now: float) -> list[StandbyEntry]:
        """The standbys heard within the timeout, in choice order (the oldest first)."""
        self._expire(now)
        return sorted(self._entries.values(), key=lambda e: e.order)

    @property
    def assigned(self) -> Mapping[int, str]:
        """Lost rank -> the standby taking it (until that rank is live again)."""
        return dict(self._assigned)

    def assign(self, missing: Iterable[int], now: float) -> dict[int, StandbyEntry]:
        """Give each missing rank a live standby: an assignment made before stays while its
        standby lives; the others go, lowest rank first, to the free standbys in choice order.
        Ranks no longer missing are released (their standby joined: it is a node now).
        Returns every missing rank that has a standby."""
        lost = sorted(set(missing))
        live = {e.name: e for e in self.live(now)}
        for rank in list(self._assigned):
            if rank not in lost:
                name = self._assigned.pop(rank)
                self._entries.pop(name, None)  # took its rank: no longer a standby
            elif self._assigned[rank] not in live:
                del self._assigned[rank]  # the standby itself was lost
        busy = set(self._assigned.values())
        free = [e for e in live.values() if e.name not in busy]
        free.sort(key=lambda e: e.order)
        for rank in lost:
            if rank in self._assigned:
                continue
            fit = next((e for e in free if e.ranks is None or rank in e.ranks), None)
            if fit is not None:
                free.remove(fit)
                self._assigned[rank] = fit.name
        return {rank: live[name] for rank, name in sorted(self._assigned.items())}

    def _expire(self, now: float) -> None:
        for name, entry in list(self._entries.items()):
            if now - entry.heard > self.timeout:
                del self._entries[name]
