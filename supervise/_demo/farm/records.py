"""What the farm demo saw, rebuilt from files and the farm's answers: step executions (from the
pipeline's ``start``/``done`` files), each task's states, the node loss and the takeovers.

Pure functions over recorded data, so the timeline, the checks and the picture are tested
without a farm."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from supervise._demo.farm.pipeline import STAGES


@attrs.frozen(slots=True)
class StepRun:
    """One execution of one step: by which attempt, on which node, in which worker, when."""

    task: str
    step: str
    attempt: int
    node: str
    pid: int
    started: float  # wall-clock seconds
    done: float | None  # None: it never finished (its worker died)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.step}"


@attrs.frozen(slots=True)
class StateChange:
    """One move of a task's state machine, as the farm reported it."""

    at: float  # wall-clock seconds
    state: str
    reason: str
    detail: str = ""


@attrs.frozen(slots=True)
class NodeLoss:
    """The node the demo killed: when, which processes, which tasks ran a step there."""

    rank: int
    at: float  # wall-clock seconds of the kill
    agent_pid: int
    pids: tuple[int, ...]  # its workers and other descendants, killed with it
    tasks: tuple[str, ...]  # tasks with a step running there at the kill


@attrs.frozen(slots=True)
class Takeover:
    """A task moved off the lost node: from its loss to its first step on another node."""

    task: str
    lost_node: str
    lost_step: str | None  # the step running at the kill (re-run: it never finished)
    node: str  # where it resumed
    step: str  # the first step it ran there
    seconds: float  # from the kill to that step's start
    replayed: tuple[str, ...]  # steps finished before the loss, not run again


@attrs.define(slots=True)
class TaskView:
    """Everything about one task: its runs, its states, its result."""

    task_id: str
    seed: int
    state: str = "unknown"
    attempts: int = 0
    states: list[StateChange] = attrs.field(factory=list)
    runs: list[StepRun] = attrs.field(factory=list)
    error: str | None = None
    equal: bool | None = None  # its result equals the failure-free run's

    @property
    def nodes(self) -> list[str]:
        """The nodes it ran steps on, in order."""
        out: list[str] = []
        for r in sorted(self.runs, key=lambda r: r.started):
            if not out or out[-1] != r.node:
                out.append(r.node)
        return out

    def by_attempt(self) -> dict[tuple[int, str, int], list[StepRun]]:
        """Its runs grouped by (attempt, node, worker pid), in order."""
        out: dict[tuple[int, str, int], list[StepRun]] = {}
        for r in sorted(self.runs, key=lambda r: r.started):
            out.setdefault((r.attempt, r.node, r.pid), []).append(r)
        return out


def _split_key(key: str) -> tuple[str, str]:
    task, _, step = key.rpartition("/")
    return task, step


def read_runs(effects: Path) -> list[StepRun]:
    """Every step execution recorded in ``effects`` (``start`` files, paired with ``done``)."""
    starts: dict[tuple[str, int, int], dict[str, Any]] = {}
    dones: dict[tuple[str, int, int], float] = {}
    for path in sorted(effects.iterdir()) if effects.is_dir() else []:
        if path.suffix not in (".start", ".done"):
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        ident = (str(rec["key"]), int(rec["attempt"]), int(rec["pid"]))
        if rec["what"] == "start":
            starts[ident] = rec
        else:
            dones[ident] = float(rec["t"])
    runs = []
    for ident, rec in starts.items():
        task, step = _split_key(ident[0])
        runs.append(
            StepRun(
                task, step, ident[1], str(rec["node"]), ident[2], float(rec["t"]), dones.get(ident)
            )
        )
    return sorted(runs, key=lambda r: (r.started, r.key))


def running_at(runs: Iterable[StepRun], at: float) -> list[StepRun]:
    """The runs in progress at ``at`` (started, not yet done)."""
    return [r for r in runs if r.started <= at and (r.done is None or r.done > at)]


def executions(runs: Iterable[StepRun]) -> dict[str, tuple[int, int]]:
    """Per idempotency key: (executions started, executions finished)."""
    out: dict[str, tuple[int, int]] = {}
    for r in runs:
        started, finished = out.get(r.key, (0, 0))
        out[r.key] = (started + 1, finished + (r.done is not None))
    return out


def reruns(runs: Sequence[StepRun]) -> list[str]:
    """Keys of steps that ran again after an execution of theirs had finished (must be none)."""
    bad = []
    for key in sorted({r.key for r in runs}):
        mine = [r for r in runs if r.key == key]
        first_done = min((r.done for r in mine if r.done is not None), default=None)
        if first_done is not None and any(r.started >= first_done for r in mine):
            bad.append(key)
    return bad


def missing(runs: Sequence[StepRun], tasks: Iterable[str]) -> list[str]:
    """Keys of steps of ``tasks`` that never finished anywhere."""
    done = {r.key for r in runs if r.done is not None}
    return [f"{t}/{s}" for t in tasks for s in STAGES if f"{t}/{s}" not in done]


def takeovers(runs: Sequence[StepRun], loss: NodeLoss) -> list[Takeover]:
    """For each task with a step on the lost node at the kill: where and when it resumed."""
    out = []
    lost = str(loss.rank)
    for task in loss.tasks:
        mine = sorted((r for r in runs if r.task == task), key=lambda r: r.started)
        cut = next((r for r in running_at(mine, loss.at) if r.node == lost), None)
        later = [r for r in mine if r.started > loss.at and r.node != lost]
        if not later:
            continue
        first = later[0]
        replayed = tuple(r.step for r in mine if r.done is not None and r.done <= loss.at)
        out.append(
            Takeover(
                task,
                lost,
                None if cut is None else cut.step,
                first.node,
                first.step,
                first.started - loss.at,
                replayed,
            )
        )
    return out


def state_changes(history: Iterable[Mapping[str, Any] | Any]) -> list[StateChange]:
    """A task's history (`Transition`s or their JSON) as `StateChange`s, wall-clock times."""
    out = []
    for t in history:
        get = t.get if isinstance(t, Mapping) else lambda k, _t=t: getattr(_t, k, None)
        at = get("wall_time") or get("time") or get("at") or 0.0
        target = get("target") or get("to")
        detail = str(get("detail") or "")
        out.append(StateChange(float(at), str(target), str(get("reason")), detail))
    return out
