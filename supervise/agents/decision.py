"""What the elected coordinator writes to the store (``--store``), fenced on its term (the
leader key's create revision): the claim of an attempt (`Claim`) and the restart decision
(`Decision`: the generation, the selected version, what each node fetches, the rendezvous
port). Followers act on these, so a message can only point at them, never replace them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from supervise.agents import messages as m

#: One shard to fetch before the restart: (training rank, source, node holding it).
Fetch = tuple[int, str, int]


def _fetches(raw: Mapping[Any, Sequence[Sequence[Any]]]) -> dict[int, tuple[Fetch, ...]]:
    return {
        int(node): tuple((int(r), str(s), int(n)) for r, s, n in rows) for node, rows in raw.items()
    }


def _pairs(raw: Sequence[Sequence[Any]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in raw)


def _ints(raw: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(n) for n in raw)


def _carrier(raw: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in raw.items()}


_int = attrs.validators.instance_of(int)


@attrs.frozen(slots=True)
class Decision:
    """One restart of every node in ``nodes``, decided by node ``leader`` in term ``term``."""

    generation: int = attrs.field(validator=_int)
    step: int = attrs.field(validator=_int)
    port: int = attrs.field(validator=_int)
    attempt: int = attrs.field(validator=_int)
    nodes: tuple[int, ...] = attrs.field(converter=_ints)
    trigger: str = attrs.field(default="", validator=attrs.validators.instance_of(str))
    fetch: dict[int, tuple[Fetch, ...]] = attrs.field(factory=dict, converter=_fetches, hash=False)
    rewinds: tuple[tuple[int, int], ...] = attrs.field(default=(), converter=_pairs)
    trace: dict[str, str] = attrs.field(factory=dict, converter=_carrier, hash=False)
    leader: int = attrs.field(default=-1, validator=_int)
    term: int = attrs.field(default=0, validator=_int)

    def body(self) -> dict[str, object]:
        """The record's fields (JSON-ready; the seat adds ``leader`` and ``term``)."""
        return {
            "generation": self.generation,
            "step": self.step,
            "port": self.port,
            "attempt": self.attempt,
            "nodes": list(self.nodes),
            "trigger": self.trigger,
            "fetch": {str(n): [list(f) for f in rows] for n, rows in self.fetch.items()},
            "rewinds": [list(r) for r in self.rewinds],
            "trace": dict(self.trace),
        }

    @classmethod
    def from_json(cls, raw: bytes) -> Decision:
        """Back from the store's record; ValueError naming what is wrong."""
        try:
            data = json.loads(raw)
            return cls(
                generation=data["generation"],
                step=data["step"],
                port=data["port"],
                attempt=data["attempt"],
                nodes=data["nodes"],
                trigger=data.get("trigger", ""),
                fetch=data.get("fetch", {}),
                rewinds=data.get("rewinds", []),
                trace=data.get("trace", {}),
                leader=data["leader"],
                term=data["term"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"bad decision record {raw[:200]!r}: {exc!r}") from None

    def restart_for(self, node: int) -> m.Restart:
        """``node``'s restart, as the store says."""
        return m.Restart(
            self.generation,
            self.step,
            self.port,
            self.attempt,
            self.trigger,
            list(self.fetch.get(node, ())),
            list(self.rewinds),
        )

    def matches(self, restart: m.Restart) -> bool:
        """Whether a restart message says what this decision says (a nudge, not a forgery)."""
        return (restart.generation, restart.attempt, restart.step, restart.master_port) == (
            self.generation,
            self.attempt,
            self.step,
            self.port,
        )


@attrs.frozen(slots=True)
class Claim:
    """A (re)start attempt begun by node ``leader`` in term ``term``, before it stops any
    worker: followers stop theirs only for the generation claimed."""

    generation: int = attrs.field(validator=_int)
    attempt: int = attrs.field(validator=_int)
    trigger: str = attrs.field(validator=attrs.validators.instance_of(str))
    leader: int = attrs.field(validator=_int)
    term: int = attrs.field(validator=_int)

    @classmethod
    def from_json(cls, raw: bytes) -> Claim:
        """Back from the store's record; ValueError naming what is wrong."""
        try:
            data = json.loads(raw)
            return cls(
                data["generation"], data["attempt"], data["trigger"], data["leader"], data["term"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad attempt record {raw[:200]!r}: {exc!r}") from None
