"""What a farm demo run produced: the tasks, the node loss, the takeovers, the checks."""

from __future__ import annotations

from pathlib import Path

import attrs

from supervise._demo.farm.config import FarmDemoConfig
from supervise._demo.farm.records import NodeLoss, StepRun, Takeover, TaskView
from supervise._demo.result import Check
from supervise._testing.procs import SeenProcess


@attrs.define(slots=True)
class FarmResult:
    """Everything the report and the picture show (times: wall-clock seconds)."""

    config: FarmDemoConfig
    policy_path: Path
    peer_timeout: float
    run_dir: Path
    started_at: float
    tasks: list[TaskView] = attrs.field(factory=list)
    runs: list[StepRun] = attrs.field(factory=list)
    loss: NodeLoss | None = None
    takeovers: list[Takeover] = attrs.field(factory=list)
    checks: list[Check] = attrs.field(factory=list)
    survivors: list[SeenProcess] = attrs.field(factory=list)
    processes_seen: int = 0
    failure: str | None = None
    interrupted: str | None = None
    farm_started_at: float | None = None  # every node up, the first task submitted
    farm_finished_at: float | None = None  # the last result in
    reference_seconds: float | None = None
    timeline_path: Path | None = None

    @property
    def ok(self) -> bool:
        """Every check held and nothing failed along the way."""
        return self.failure is None and bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def takeover_target(self) -> float:
        """The issue's target for a takeover: peer_timeout + 1 s."""
        return self.peer_timeout + 1.0

    def task(self, task_id: str) -> TaskView:
        return next(t for t in self.tasks if t.task_id == task_id)
