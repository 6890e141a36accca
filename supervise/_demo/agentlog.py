"""What one node agent is doing, read from its JSON log lines (and its workers' progress lines,
which the agent forwards into its log).

The demo drives the scenario from these: which worker PIDs a generation runs, when training
(re)started on a node, how far it got, whether the node finished or gave up.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from typing import Any

import attrs

_WORKER = re.compile(r"worker rank (\d+) gen (\d+)")


@attrs.define(slots=True)
class GenerationView:
    """One generation of a node's workers."""

    number: int
    step: int  # the step restored (-1: a fresh start)
    pids: dict[int, int] = attrs.field(factory=dict)  # global rank -> pid
    started_at: float = 0.0
    resumed_at: float | None = None  # every local worker completed its first step
    last_step: int | None = None  # from the workers' progress lines
    last_step_at: float | None = None


@attrs.define(slots=True)
class Note:
    """A line worth telling the user (a detection, a recovery decision, a fetch)."""

    at: float
    text: str


@attrs.define(slots=True)
class NodeLog:
    """The state of one agent process as its log tells it."""

    rank: int
    generations: dict[int, GenerationView] = attrs.field(factory=dict)
    finished_at: float | None = None
    gave_up: str | None = None
    peers_lost: list[tuple[float, int]] = attrs.field(factory=list)
    notes: list[Note] = attrs.field(factory=list)
    lines: int = 0
    malformed: int = 0

    @property
    def generation(self) -> GenerationView | None:
        """The newest generation this node started."""
        return self.generations[max(self.generations)] if self.generations else None

    def feed(self, text: str) -> None:
        """Take one line of the agent's stderr/stdout."""
        self.lines += 1
        try:
            entry = json.loads(text)
        except ValueError:
            self.malformed += 1
            return
        if not isinstance(entry, dict):
            self.malformed += 1
            return
        at = _when(entry)
        event = entry.get("event")
        handler = _HANDLERS.get(event) if isinstance(event, str) else None
        if handler is not None:
            handler(self, entry, at)

    # -- handlers --------------------------------------------------------------------------

    def _workers_started(self, e: dict[str, Any], at: float) -> None:
        gen = _int(e.get("generation"))
        if gen is None:
            return
        view = self._gen(gen, _int(e.get("step"), -1), at)
        pids = e.get("pids")
        if isinstance(pids, dict):
            for rank, pid in pids.items():
                if _int(rank) is not None and _int(pid) is not None:
                    view.pids[int(rank)] = int(pid)

    def _resumed(self, e: dict[str, Any], at: float) -> None:
        gen = _int(e.get("generation"))
        if gen is not None:
            self._gen(gen, _int(e.get("step"), -1), at).resumed_at = at

    def _output(self, e: dict[str, Any], at: float) -> None:
        match = _WORKER.fullmatch(str(e.get("child", "")))
        line = e.get("line")
        if match is None or not isinstance(line, str) or not line.startswith("{"):
            return
        try:
            progress = json.loads(line)
        except ValueError:
            return
        if not isinstance(progress, dict) or progress.get("event") != "step":
            return
        step = _int(progress.get("step"))
        view = self.generations.get(int(match.group(2)))
        if step is None or view is None:
            return
        if view.last_step is None or step > view.last_step:
            view.last_step, view.last_step_at = step, at

    def _finished(self, _e: dict[str, Any], at: float) -> None:
        self.finished_at = at

    def _gave_up(self, e: dict[str, Any], at: float) -> None:
        self.gave_up = str(e.get("reason") or "gave up")
        self.notes.append(Note(at, f"node {self.rank} gave up: {self.gave_up}"))

    def _peer_lost(self, e: dict[str, Any], at: float) -> None:
        peer = _int(e.get("rank"))
        if peer is not None:
            self.peers_lost.append((at, peer))

    def _recovery(self, e: dict[str, Any], at: float) -> None:
        self.notes.append(
            Note(at, f"coordinator (node {self.rank}): recovery, trigger {e.get('trigger')}")
        )

    def _hung(self, e: dict[str, Any], at: float) -> None:
        # The coordinator's judgement: the hung rank may be on another node.
        node, rank, silent = e.get("node", self.rank), e.get("rank"), e.get("silent_for_s")
        self.notes.append(Note(at, f"node {node}: rank {rank} silent for {silent} s"))

    def _non_finite(self, e: dict[str, Any], at: float) -> None:
        self.notes.append(
            Note(
                at,
                f"node {self.rank}: rank {e.get('rank')} step {e.get('step')} {e.get('metrics')}",
            )
        )

    def _fetched(self, e: dict[str, Any], at: float) -> None:
        self.notes.append(
            Note(
                at,
                f"node {self.rank}: fetched rank {e.get('rank')}'s shard of step {e.get('step')}"
                f" from node {e.get('holder')}",
            )
        )

    def _gen(self, number: int, step: int | None, at: float) -> GenerationView:
        view = self.generations.get(number)
        if view is None:
            view = GenerationView(number, -1 if step is None else step, started_at=at)
            self.generations[number] = view
        return view


_HANDLERS = {
    "workers started": NodeLog._workers_started,
    "training resumed": NodeLog._resumed,
    "process_output": NodeLog._output,
    "training finished on this node": NodeLog._finished,
    "giving up": NodeLog._gave_up,
    "peer_lost": NodeLog._peer_lost,
    "recovery": NodeLog._recovery,
    "worker hung": NodeLog._hung,
    "non-finite metric": NodeLog._non_finite,
    "shard fetched from a peer": NodeLog._fetched,
}


def _int(value: object, default: int | None = None) -> int | None:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _when(entry: dict[str, Any]) -> float:
    """The line's own timestamp (ISO 8601, UTC), or now."""
    stamp = entry.get("timestamp")
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            pass
    return time.time()
