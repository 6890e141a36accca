"""What a demo run produced: the faults, the recoveries that answered them, the checks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TextIO

import attrs

from supervise._demo.cluster import DemoCluster
from supervise._demo.compare import Comparison
from supervise._demo.config import DemoConfig
from supervise._demo.faults import Injection
from supervise._demo.timeline import RecoveryView
from supervise._testing.procs import SeenProcess
from supervise.policy import Policy


@attrs.frozen(slots=True)
class Check:
    """One thing the demo promises, whether it held, and the evidence."""

    name: str
    ok: bool
    detail: str


@attrs.define(slots=True)
class Entry:
    """A row of the timeline: an injected fault and the recovery that answered it (either may
    be missing: a recovery nobody injected, a fault whose trace never arrived)."""

    injection: Injection | None
    recovery: RecoveryView | None

    @property
    def at(self) -> float:
        if self.injection is not None:
            return self.injection.at
        assert self.recovery is not None
        return self.recovery.detected_at


@attrs.define(slots=True)
class DemoResult:
    """Everything the report and the picture show."""

    config: DemoConfig
    policy: Policy
    policy_path: Path
    run_dir: Path
    started_at: float
    injections: list[Injection] = attrs.field(factory=list)
    recoveries: list[RecoveryView] = attrs.field(factory=list)
    entries: list[Entry] = attrs.field(factory=list)
    checks: list[Check] = attrs.field(factory=list)
    cluster: DemoCluster | None = None
    comparison: Comparison | None = None
    survivors: list[SeenProcess] = attrs.field(factory=list)
    processes_seen: int = 0
    failure: str | None = None
    interrupted: str | None = None  # the signal (SIGINT, SIGTERM) that stopped the demo early
    training_started_at: float | None = None
    training_finished_at: float | None = None
    reference_seconds: float | None = None
    forwarded_to: tuple[str, ...] = ()
    forward_errors: tuple[str, ...] = ()
    timeline_path: Path | None = None

    @property
    def ok(self) -> bool:
        """Every check held and nothing failed along the way."""
        return self.failure is None and bool(self.checks) and all(c.ok for c in self.checks)


def match(injections: list[Injection], views: list[RecoveryView]) -> list[Entry]:
    """Pair each fault with the first recovery detected after it (and before the next fault);
    any other recovery becomes a row of its own. In time order."""
    entries: list[Entry] = []
    used: set[str] = set()
    for i, inj in enumerate(injections):
        until = injections[i + 1].at if i + 1 < len(injections) else float("inf")
        found = next(
            (v for v in views if v.trace_id not in used and inj.at - 0.05 <= v.detected_at < until),
            None,
        )
        if found is not None:
            used.add(found.trace_id)
        entries.append(Entry(inj, found))
    entries.extend(Entry(None, v) for v in views if v.trace_id not in used)
    return sorted(entries, key=lambda e: e.at)


class Narrator:
    """Prints the run as it happens, each line stamped with seconds since the start."""

    def __init__(self, out: TextIO, t0: float) -> None:
        self.out = out
        self.t0 = t0

    def __call__(self, text: str, *, at: float | None = None) -> None:
        t = (time.time() if at is None else at) - self.t0
        self.out.write(f"[{t:6.1f}s] {text}\n")
        self.out.flush()
