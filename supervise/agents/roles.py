"""How a node's executor and its coordinator talk: each sees the other only through one of
these protocols, so neither module imports the other (the node wires them together)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any, Protocol

import trio

from supervise.agents import messages as m
from supervise.agents.lifecycle import ExecutorState
from supervise.cluster.failure_detector import Event


class Coordinating(Protocol):
    """The coordinator as this node's executor sees it."""

    def receive(self, message: object, trace: dict[str, str]) -> None:
        """A Failure or Progress for the coordinator (never blocks)."""

    def membership_event(self, event: Event) -> None:
        """A peer was lost or came back."""

    async def manual(self, version: int, trace: dict[str, str]) -> str:
        """`supervise recover` at ``version``; raises `ValueError` when refused."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Act on the triggers while this node is the coordinator, until cancelled."""

    def standby_hello(self, hello: m.StandbyHello) -> m.StandbyOrder:
        """A standby agent's hello; the order says whether it takes a lost rank now."""
        ...


class Executing(Protocol):
    """This node's executor as the coordinator sees it."""

    @property
    def state(self) -> ExecutorState: ...

    @property
    def finished_nodes(self) -> Set[int]:
        """Nodes whose training finished (their leaving is no failure)."""
        ...

    @property
    def rewinds(self) -> Sequence[tuple[int, int]]:
        """Earlier restarts as ``(generation, step)`` (see `selection.select`)."""
        ...

    def coordinator_rank(self) -> int: ...

    def known_generation(self) -> int: ...

    async def prepare(self, generation: int) -> m.Holding:
        """Stop the workers for a restart at ``generation``; say what this node holds."""
        ...

    def accept_restart(
        self, restart: m.Restart, trace: Mapping[str, str], *, leader: int | None = None
    ) -> None:
        """Begin this node's side of ``restart`` in the background."""

    def give_up(self, reason: str, exit_code: int) -> None:
        """Stop for good: workers stopped, the node exits with ``exit_code``."""

    def hand_over(self, trigger: str, since: float, evidence: Mapping[str, Any]) -> None:
        """A recovery this node coordinated was cut short (deposed, ``--store``): tell the
        new coordinator its trigger until a restart moves this node past its generation."""
