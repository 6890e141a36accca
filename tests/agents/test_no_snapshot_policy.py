"""`recovery.on_no_snapshot`: a recovery that finds no complete version after training made
progress fails loudly ("stop", the default) or starts over ("restart"); a fresh job starts."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from supervise.agents import messages as m
from supervise.agents.coordinator import Coordinator
from supervise.agents.lifecycle import EXIT_GAVE_UP
from supervise.agents.selection import Holdings
from supervise.policy import Policy
from supervise.snapshot.retention import VersionInfo
from supervise.telemetry import Trigger


class _Node:
    """The parts of an Executor a recovery uses; restarts and give-ups are recorded."""

    def __init__(self) -> None:
        self.finished_nodes: set[int] = set()
        self.rewinds: list[tuple[int, int]] = []
        self.restarts: list[m.Restart] = []
        self.gave_up: list[tuple[str, int]] = []

    def known_generation(self) -> int:
        return 1

    def coordinator_rank(self) -> int:
        return 0

    def accept_restart(self, restart: m.Restart, carrier: dict[str, str]) -> None:
        self.restarts.append(restart)

    def give_up(self, reason: str, code: int) -> None:
        self.gave_up.append((reason, code))


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[int, object]] = []

    def try_send(self, node: int, message: object) -> bool:
        self.sent.append((node, message))
        return True

    async def request(self, node: int, message: object, **kwargs: Any) -> None:
        self.sent.append((node, message))


def _v(step: int) -> VersionInfo:
    return VersionInfo(step, 1, 0.0, 64)


def _coordinator(on_no_snapshot: str | None, held: dict[int, Holdings]) -> Coordinator:
    recovery: dict[str, Any] = {"max_attempts": 2, "backoff": {"initial": 0}}
    if on_no_snapshot is not None:
        recovery["on_no_snapshot"] = on_no_snapshot
    policy = Policy.from_dict({"recovery": recovery})
    ctx: Any = SimpleNamespace(
        config=SimpleNamespace(
            rank=0,
            n_nodes=2,
            world_size=2,
            nproc_per_node=1,
            ranks_of=lambda node: range(node, node + 1),
        ),
        policy=policy,
        transport=_Transport(),
        seat=None,
    )
    c = Coordinator(ctx, _Node())  # type: ignore[arg-type]

    async def wait_for_nodes(recovery: object) -> None:
        return None

    async def prepare_all(gen: int, carrier: dict[str, str]) -> dict[int, m.Holding]:
        return {n: m.Holding.of(h, port=1234 if n == 0 else 0) for n, h in held.items()}

    async def await_resumed(gen: int, nodes: list[int], recovery: object) -> None:
        return None

    c._wait_for_nodes = wait_for_nodes  # type: ignore[method-assign]
    c._prepare_all = prepare_all  # type: ignore[method-assign]
    c._await_resumed = await_resumed  # type: ignore[method-assign]
    return c


# The survivor holds its own rank at 578 and the lost rank's replica at 575 only: the user's
# "newest, 578, lacks rank 1" after local retention evicted 575.
NO_COMMON = {
    0: Holdings.of(0, ram=[(0, _v(578)), (1, _v(575))]),
    1: Holdings.of(1),  # the replacement: nothing
}


async def _recover(c: Coordinator) -> None:
    await c._recover(Trigger.PEER_LOST, 0.0, {"peer": 1})


async def test_no_complete_version_after_progress_stops_loudly_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = _coordinator(None, NO_COMMON)
    await _recover(c)
    node: Any = c.node
    assert node.restarts == []  # nothing restarted from step 0
    [(reason, code)] = node.gave_up
    assert code == EXIT_GAVE_UP == 3
    assert "training up to step 578 would be lost" in reason
    assert "lacks rank 1" in reason
    assert "recovery.on_no_snapshot" in reason
    # every other node is told to give up with the same reason
    sent = [msg for _, msg in c.ctx.transport.sent]
    assert sent == [m.GiveUp(reason, EXIT_GAVE_UP)]


async def test_on_no_snapshot_restart_starts_over_from_step_0(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = _coordinator("restart", NO_COMMON)
    await _recover(c)
    node: Any = c.node
    assert node.gave_up == []
    assert [r.step for r in node.restarts] == [-1]  # FRESH
    sent = [msg for _, msg in c.ctx.transport.sent]
    assert [r.step for r in sent] == [-1]


@pytest.mark.parametrize("on_no_snapshot", ["stop", "restart"])
async def test_a_job_with_no_snapshot_anywhere_starts_from_scratch(
    on_no_snapshot: str, autojump_clock: trio.testing.MockClock
) -> None:
    c = _coordinator(on_no_snapshot, {0: Holdings.of(0), 1: Holdings.of(1)})
    await _recover(c)
    node: Any = c.node
    assert node.gave_up == []
    assert [r.step for r in node.restarts] == [-1]


async def test_a_complete_version_is_restored_whatever_the_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    held = {0: Holdings.of(0, ram=[(0, _v(575)), (0, _v(578)), (1, _v(575))]), 1: Holdings.of(1)}
    c = _coordinator("stop", held)
    await _recover(c)
    node: Any = c.node
    assert [r.step for r in node.restarts] == [575]
