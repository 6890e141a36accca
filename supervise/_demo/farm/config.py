"""What one `supervise demo --tasks` run does: how many farm nodes and pipelines, how long a
step takes, which node is lost, where the files go. Validated at construction."""

from __future__ import annotations

from pathlib import Path

import attrs

from supervise._validation import InvalidValue, number

MIN_NODES = 3  # the coordinator (rank 0), the node lost, a node to take its tasks over
MAX_NODES = 8
NODE_CPUS = 6  # each farm node offers 6 cpus (--cpus 6) ...
TASK_CPUS = 2  # ... and a pipeline asks for 2: three pipelines a node
SLOTS = NODE_CPUS // TASK_CPUS


def _tasks_fit(inst: FarmDemoConfig, _attr: attrs.Attribute[int], value: int) -> None:
    most = SLOTS * (inst.nodes - 1)
    if not SLOTS < value <= most:
        raise InvalidValue(
            "tasks",
            value,
            f"must be {SLOTS + 1}..{most}: more than one node holds ({SLOTS}), so one runs off"
            f" the coordinator, and no more than the {inst.nodes - 1} nodes left after the"
            " loss hold",
        )


@attrs.frozen(slots=True)
class FarmDemoConfig:
    """One run of `supervise demo --tasks`."""

    out_dir: Path = attrs.field(converter=Path)
    nodes: int = attrs.field(default=3, validator=number(ge=MIN_NODES, le=MAX_NODES, integer=True))
    tasks: int = attrs.field(default=5, validator=[number(ge=1, integer=True), _tasks_fit])
    step_delay: float = attrs.field(default=0.5, validator=number(ge=0.1, le=5.0))
    policy: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    keep_shm: bool = False
    limit_s: float = attrs.field(default=180.0, validator=number(gt=0))  # for the whole farm run

    @classmethod
    def quick(cls, out_dir: Path | str) -> FarmDemoConfig:
        """The short run the test suite uses: 4 pipelines, 0.3 s steps."""
        return cls(out_dir=Path(out_dir), tasks=4, step_delay=0.3, limit_s=120.0)

    @property
    def task_ids(self) -> list[str]:
        """The pipelines' ids (their seeds are 1..tasks)."""
        return [f"pipeline-{i}" for i in range(1, self.tasks + 1)]
