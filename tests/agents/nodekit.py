"""Real node agents on loopback for the agent tests: ``supervise._testing.LocalCluster`` running
the torch-free ``fake_worker.py`` under a fast policy (see that class for starting, reading
logs, faults, waiting and the cleanup by PID)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from supervise._testing import LocalCluster, fault_file, free_ports

__all__ = ["FAKE_WORKER", "FAST_POLICY", "Nodes", "free_ports", "nodes"]

HERE = Path(__file__).parent
FAKE_WORKER = HERE / "fake_worker.py"

FAST_POLICY = """
[snapshot]
every_steps = 5
[retention]
keep_last = 2
[recovery]
max_attempts = 4
heartbeat_timeout = 3.0
startup_timeout = 30.0
preload = ["json"]  # spares: the restart path of a warm worker, without torch's import cost
[recovery.backoff]
initial = 0.05
max = 0.5
jitter = 0.0
reset_after = 2.0
[cluster]
heartbeat_interval = 0.2
peer_timeout = 2.0
rejoin_timeout = 60.0
"""


class Nodes(LocalCluster):
    """A cluster of node agents running ``fake_worker.py``: its fault files in ``faults``,
    its final states in ``out``."""

    def __init__(
        self,
        tmp: Path,
        n: int,
        *,
        policy: str = FAST_POLICY,
        worker: list[str] | None = None,
        worker_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        steps: int = 120,
    ) -> None:
        self.faults = tmp / "faults"
        self.faults.mkdir(exist_ok=True)
        self.out = tmp / "out"
        command = worker or [
            sys.executable,
            str(FAKE_WORKER),
            "--faults",
            str(self.faults),
            "--out",
            str(self.out),
            "--steps",
            str(steps),
            *(worker_args or []),
        ]
        super().__init__(
            tmp,
            n,
            command=command,
            policy=policy,
            env={**(env or {}), "PYTHONUNBUFFERED": "1"},
            worker_shutdown=2.0,
            wait_s=90.0,
        )

    def recoveries(self, rank: int = 0) -> list[dict[str, Any]]:
        return self.events(rank, "recovery")

    def fault(self, kind: str, rank: int) -> None:
        """Make ``rank``'s fake worker fail (``crash``, ``hang``, ``nan``...) at its next step."""
        fault_file(self.faults, kind, rank)


@contextmanager
def nodes(tmp: Path, n: int, **kwargs: Any) -> Iterator[Nodes]:
    """``Nodes`` whose every process is killed by PID when the block ends (its logs' tails
    printed first when it failed)."""
    with Nodes(tmp, n, **kwargs) as cluster:
        yield cluster
