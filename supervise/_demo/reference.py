"""The failure-free reference: the same training script, launched plainly with torchrun's
environment (no agents, no faults), to compare the demo's final parameters against.

Why plain workers rather than agents without faults: the reference must not share the
machinery under test. Plain workers run the Snapshotter standalone (no agent in the
environment), so a fault in the agents' restore path cannot hide by repeating itself in the
reference. Each run gets a fresh working directory: a standalone Snapshotter restores from
its persist directory, which must start empty.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from supervise._demo.cluster import DemoFailure
from supervise._testing.procs import PidBook
from supervise.agents.workers import free_port
from supervise.runtime import ExitReason, OsProcess, OutputLine, ProcessHandle

_DROP = (
    "SUPERVISE_AGENT",
    "SUPERVISE_AGENT_TOKEN",
    "SUPERVISE_GENERATION",
    "SUPERVISE_NODE_RANK",
    "SUPERVISE_DEMO_FAULTS",
)


def reference_env(base: Mapping[str, str], *, rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's variables for one plain worker, without any supervise agent variable."""
    env = {k: v for k, v in base.items() if k not in _DROP and not k.startswith("OTEL_")}
    env.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


async def run_reference(
    command: Sequence[str],
    *,
    world: int,
    run_dir: Path,
    book: PidBook,
    limit_s: float,
) -> float:
    """Run ``world`` plain workers to the end; returns the seconds it took. DemoFailure if a
    worker fails or it takes longer than ``limit_s``."""
    run_dir.mkdir(parents=True)
    port = free_port("127.0.0.1")
    exits: dict[int, ExitReason] = {}
    started = trio.current_time()
    with contextlib.ExitStack() as stack:
        logs = [
            stack.enter_context(open(run_dir / f"worker{r}.log", "w", encoding="utf-8"))
            for r in range(world)
        ]

        def write(rank: int, line: OutputLine) -> None:
            logs[rank].write(line.text + "\n")

        async def one(
            rank: int, *, task_status: trio.TaskStatus[ProcessHandle] = trio.TASK_STATUS_IGNORED
        ) -> None:
            spec = OsProcess(
                list(command),
                env=reference_env(os.environ, rank=rank, world=world, port=port),
                cwd=run_dir,
                inherit_env=False,
                on_output=functools.partial(write, rank),
                log_output=False,
            )
            exits[rank] = await spec.run(
                shutdown=5.0, label=f"reference rank {rank}", task_status=task_status
            )

        with trio.move_on_after(limit_s) as scope:
            async with trio.open_nursery() as nursery:
                for rank in range(world):
                    handle = await nursery.start(functools.partial(one, rank))
                    book.add(handle.pid, f"reference (rank {rank})")
    if scope.cancelled_caught:
        raise DemoFailure(f"the reference run did not finish within {limit_s:.0f} s")
    bad = {r: e for r, e in exits.items() if e.exit_code != 0}
    if bad:
        rank, reason = min(bad.items())
        raise DemoFailure(
            f"reference worker rank {rank} failed ({reason}); see {run_dir}/worker{rank}.log"
        )
    return trio.current_time() - started
