"""The recoveries of a run, rebuilt from the agents' OpenTelemetry spans.

One recovery is one trace: the root ``supervise.recovery`` (coordinator; its start is when
the failure began, its events say what happened) and the phases every node ran as its
children (``detect`` and ``select_checkpoint`` on the coordinator; ``fetch``, ``restore``
and ``resume`` on each node). Pure functions of the received spans.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from supervise.telemetry import RECOVERY_SPAN, Attr, Outcome, Phase
from supervise.telemetry.receiver import ReceivedSpan

PHASES: tuple[str, ...] = tuple(p.value for p in Phase)
_PREFIX = RECOVERY_SPAN + "."
_TERMINAL = frozenset(o.value for o in Outcome)


@attrs.frozen(slots=True)
class PhaseRun:
    """One node's run of one phase (wall-clock seconds)."""

    phase: str
    node: int
    attempt: int
    start: float
    end: float
    source: str | None = None
    nbytes: int | None = None
    version: int | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return max(0.0, self.end - self.start)


@attrs.frozen(slots=True)
class RecoveryView:
    """One recovery: what triggered it, its phases on every node, how it ended."""

    trace_id: str
    trigger: str
    node: int | None  # the coordinator that ran it
    start: float  # when the failure began (the detect phase is backdated to it)
    end: float
    outcome: str  # completed | failed | exhausted | unfinished
    reason: str
    attempts: int
    version: int | None
    phases: tuple[PhaseRun, ...]
    events: tuple[tuple[str, float], ...]

    @property
    def seconds(self) -> float:
        """Failure to every node's first completed step (the root span)."""
        return max(0.0, self.end - self.start)

    @property
    def detected_at(self) -> float:
        """When the failure was noticed: the end of ``detect``."""
        runs = self.runs("detect")
        return runs[0].end if runs else self.start

    @property
    def tries(self) -> int:
        """How many restart attempts it took (1: the first one worked)."""
        return max(1, len({p.attempt for p in self.phases if p.phase != "detect"}))

    def runs(self, phase: str, *, attempt: int | None = None) -> list[PhaseRun]:
        """Every node's run of ``phase`` in ``attempt`` (default: the last attempt)."""
        want = self.attempts if attempt is None else attempt
        if phase == "detect":  # detect runs once, before the first attempt
            return [p for p in self.phases if p.phase == phase]
        return sorted(
            (p for p in self.phases if p.phase == phase and p.attempt == want),
            key=lambda p: p.node,
        )

    def fetches(self) -> list[PhaseRun]:
        """Every node's fetch in any attempt: a shard fetched into RAM by an attempt that
        then failed stays there, and a later attempt restores it from local RAM."""
        return sorted(
            (p for p in self.phases if p.phase == "fetch"), key=lambda p: (p.attempt, p.node)
        )

    def window(self, phase: str) -> tuple[float, float] | None:
        """From the first node entering ``phase`` to the last leaving it (last attempt;
        fetch: every attempt, see `fetches`)."""
        runs = self.fetches() if phase == "fetch" else self.runs(phase)
        if not runs:
            return None
        return min(p.start for p in runs), max(p.end for p in runs)

    def sources(self) -> dict[int, str]:
        """Where each node's restored shards came from (fetch wins over restore: a fetched
        shard is restored from local RAM after the fetch, in the same or a later attempt)."""
        out: dict[int, str] = {}
        for run in [*self.runs("restore"), *self.fetches()]:
            if run.source:
                out[run.node] = run.source
        return out

    def nbytes(self, phase: str) -> int:
        """Bytes moved by ``phase`` on every node together (last attempt; fetch: every
        attempt)."""
        runs = self.fetches() if phase == "fetch" else self.runs(phase)
        return sum(p.nbytes or 0 for p in runs)

    def failed_attempts(self) -> list[tuple[int, str]]:
        """The attempts before the last, each with the first error a phase span recorded."""
        out = []
        for attempt in range(1, self.attempts):
            errors = [p.error for p in self.phases if p.attempt == attempt and p.error]
            out.append((attempt, errors[0] if errors else "superseded by a new attempt"))
        return out


def recoveries(spans: Iterable[ReceivedSpan]) -> list[RecoveryView]:
    """Group recovery spans by trace, oldest recovery first."""
    by_trace: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if span.name == RECOVERY_SPAN or span.name.startswith(_PREFIX):
            by_trace.setdefault(span.trace_id, []).append(span)
    views = [_view(trace_id, group) for trace_id, group in by_trace.items()]
    return sorted(views, key=lambda v: v.start)


def _view(trace_id: str, spans: Sequence[ReceivedSpan]) -> RecoveryView:
    root = next((s for s in spans if s.name == RECOVERY_SPAN), None)
    phases = tuple(
        sorted(
            (_phase(s) for s in spans if s.name.startswith(_PREFIX)),
            key=lambda p: (p.start, p.node),
        )
    )
    if root is None:  # the coordinator's root never arrived (it ended with its process)
        start = min((p.start for p in phases), default=0.0)
        end = max((p.end for p in phases), default=start)
        trigger = next(
            (str(s.attributes.get(Attr.TRIGGER)) for s in spans if Attr.TRIGGER in s.attributes),
            "?",
        )
        return RecoveryView(
            trace_id, trigger, None, start, end, "unfinished", "", _attempts(phases, None),
            None, phases, (),
        )  # fmt: skip
    events = tuple(
        (e.name, e.time_unix_nano / 1e9)
        for e in sorted(root.events, key=lambda e: e.time_unix_nano)
    )
    outcome = next((name for name, _ in reversed(events) if name in _TERMINAL), "unfinished")
    reason = next(
        (str(e.attributes.get(Attr.REASON, "")) for e in root.events if e.name == "detected"),
        "",
    )
    version = _int(root.attributes.get(Attr.SNAPSHOT_VERSION))
    if version is None:
        for e in root.events:
            if e.name == "checkpoint_selected":
                version = _int(e.attributes.get(Attr.SNAPSHOT_VERSION))
    node = _int(root.attributes.get(Attr.NODE_RANK))
    return RecoveryView(
        trace_id=trace_id,
        trigger=str(root.attributes.get(Attr.TRIGGER, "?")),
        node=node,
        start=root.start_unix_nano / 1e9,
        end=root.end_unix_nano / 1e9,
        outcome=outcome,
        reason=reason,
        attempts=_attempts(phases, _int(root.attributes.get(Attr.ATTEMPT))),
        version=version,
        phases=phases,
        events=events,
    )


def _phase(span: ReceivedSpan) -> PhaseRun:
    a = span.attributes
    nbytes = _int(a.get(Attr.BYTES))
    source = a.get(Attr.SNAPSHOT_SOURCE)
    return PhaseRun(
        phase=span.name[len(_PREFIX) :],
        node=_int(a.get(Attr.NODE_RANK)) or 0,
        attempt=_int(a.get(Attr.ATTEMPT)) or 1,
        start=span.start_unix_nano / 1e9,
        end=span.end_unix_nano / 1e9,
        source=str(source) if source is not None else None,
        nbytes=nbytes,
        version=_int(a.get(Attr.SNAPSHOT_VERSION)),
        error=span.status_message or None if span.status_code == 2 else None,
    )


def _attempts(phases: Sequence[PhaseRun], root_attempt: int | None) -> int:
    return max([root_attempt or 1, *(p.attempt for p in phases if p.phase != "detect")])


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value
