"""What one demo run does: how many node agents, how long they train, which faults, where the
results go. Validated at construction, so a bad command line is one clear line."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path

import attrs

from supervise._validation import InvalidValue, number

MIN_NODES = 2
MAX_NODES = 8


class FaultKind(enum.StrEnum):
    """The failures the demo injects, in the order it injects them by default."""

    CRASH = "crash"  # kill -9 of one worker
    HANG = "hang"  # SIGSTOP of one worker: only the heartbeat timeout notices
    NODE_LOSS = "node_loss"  # kill -9 of an agent and its worker; a replacement agent joins
    NAN = "nan"  # one rank's loss becomes NaN once

    @property
    def label(self) -> str:
        """How the timeline names it."""
        return _TITLES[self]


_TITLES = {
    FaultKind.CRASH: "worker crash",
    FaultKind.HANG: "worker hang",
    FaultKind.NODE_LOSS: "node loss",
    FaultKind.NAN: "NaN loss",
}

ALL_FAULTS: tuple[FaultKind, ...] = tuple(FaultKind)


def _faults(value: Sequence[FaultKind | str]) -> tuple[FaultKind, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    out: list[FaultKind] = []
    for item in value:
        try:
            out.append(FaultKind(str(item).strip()))
        except ValueError:
            allowed = ", ".join(f.value for f in FaultKind)
            raise InvalidValue("faults", item, f"each fault must be one of {allowed}") from None
    return tuple(out)


def _steps_for_faults(inst: DemoConfig, _attr: attrs.Attribute[int], value: int) -> None:
    needed = 60 * (len(inst.faults) + 1)
    if value < needed:
        raise InvalidValue(
            "steps", value, f"must be >= {needed} for {len(inst.faults)} fault(s) (60 per phase)"
        )


@attrs.frozen(slots=True)
class DemoConfig:
    """One run of `supervise demo`."""

    out_dir: Path = attrs.field(converter=Path)
    nodes: int = attrs.field(default=3, validator=number(ge=MIN_NODES, le=MAX_NODES, integer=True))
    faults: tuple[FaultKind, ...] = attrs.field(default=ALL_FAULTS, converter=_faults)
    steps: int = attrs.field(
        default=600, validator=[number(ge=60, integer=True), _steps_for_faults]
    )
    step_delay: float = attrs.field(default=0.05, validator=number(ge=0.0, le=1.0))
    seed: int = attrs.field(default=1234, validator=number(ge=0, integer=True))
    policy: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    keep_shm: bool = False
    reference_alongside: bool = False  # run the failure-free reference during the demo

    @classmethod
    def quick(cls, out_dir: Path | str) -> DemoConfig:
        """The short run the test suite uses: every fault, two nodes, fewer steps, the
        reference run alongside the supervised one rather than after it."""
        return cls(
            out_dir=Path(out_dir), nodes=2, steps=400, step_delay=0.03, reference_alongside=True
        )

    @property
    def log_every(self) -> int:
        """How often a worker prints its progress (steps): every step, so a fault is
        injected at a known step."""
        return 1

    def threshold(self, index: int, every: int) -> int:
        """The step training must reach before the ``index``-th fault is injected: faults
        spread evenly, leaving the last stretch for training to finish after the last one,
        each halfway between two snapshots (``every`` steps apart), so some work is redone."""
        base = int(self.steps * (index + 1) / (len(self.faults) + 1.5))
        return base - base % every + every // 2 if every > 1 else base
