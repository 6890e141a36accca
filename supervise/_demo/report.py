"""The demo's closing report as text: the recovery timeline and the checks."""

from __future__ import annotations

from collections.abc import Iterable

from supervise._demo.result import DemoResult, Entry
from supervise._demo.timeline import PHASES, PhaseRun, RecoveryView

_DETAIL = {
    "detect": "from the failure to its detection",
    "select_checkpoint": "workers stopped, lost nodes replaced, holdings gathered, version chosen",
    "fetch": "missing shards brought into this node's RAM",
    "restore": "shards copied into the model and optimizer",
    "resume": "until every rank completed a training step",
}


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def nodes_text(nodes: Iterable[int]) -> str:
    ns = sorted(set(nodes))
    if not ns:
        return "-"
    if len(ns) == 1:
        return f"node {ns[0]}"
    if ns == list(range(ns[0], ns[-1] + 1)):
        return f"nodes {ns[0]}-{ns[-1]}"
    return "nodes " + ",".join(map(str, ns))


def sources_text(rec: RecoveryView) -> str:
    by_source: dict[str, list[int]] = {}
    for node, source in sorted(rec.sources().items()):
        by_source.setdefault(source, []).append(node)
    return ", ".join(f"{s} ({nodes_text(n)})" for s, n in by_source.items()) or "-"


def startup_gap(rec: RecoveryView) -> tuple[float, float] | None:
    """From the coordinator's decision (or the last fetch) to the first worker asking for its
    restore: the workers starting (spares woken, or new processes), rendezvous. Not a span."""
    before = rec.window("fetch") or rec.window("select_checkpoint")
    restore = rec.window("restore") or rec.window("resume")
    if before is None or restore is None or restore[0] <= before[1]:
        return None
    return before[1], restore[0]


def title(entry: Entry, number: int) -> str:
    inj = entry.injection
    if inj is None:
        return f"#{number} not injected by the demo"
    return f"#{number} {inj.kind.label} at step {inj.step}: {inj.action}"


def render_entry(entry: Entry, number: int) -> list[str]:
    """One recovery: its trigger, each phase (when, how long, where, what), the total."""
    lines = [title(entry, number)]
    rec = entry.recovery
    if rec is None:
        lines.append("   no recovery trace arrived for it")
        return lines
    coordinator = "?" if rec.node is None else str(rec.node)
    reason = f" ({rec.reason})" if rec.reason else ""
    lines.append(
        f"   trigger {rec.trigger}{reason}; coordinator node {coordinator}; trace {rec.trace_id}"
    )
    lines.append(f"   {'phase':<19} {'from':>8} {'took':>8}  {'where':<10} detail")
    rows: list[tuple[float, str]] = []
    for phase in PHASES:
        window = rec.window(phase)
        if window is not None:
            runs = rec.fetches() if phase == "fetch" else rec.runs(phase)
            rows.append((window[0], _row(rec, phase, window, runs)))
    select = rec.window("select_checkpoint")
    if rec.window("fetch") is None and select is not None:
        text = "none: every shard was in its node's RAM"
        rows.append((select[1], f"   {'fetch':<19} {'-':>8} {'-':>8}  {'-':<10} {text}"))
    gap = startup_gap(rec)
    if gap is not None:
        restored = {p.node for p in rec.runs("restore")} or {p.node for p in rec.runs("resume")}
        rows.append(
            (
                gap[0] + 1e-9,
                f"   {'(workers starting)':<19} {gap[0] - rec.start:>+7.2f}s"
                f" {gap[1] - gap[0]:>7.2f}s  {nodes_text(restored):<10} workers: spares"
                " woken (or new processes), gloo rendezvous (between spans)",
            )
        )
    lines.extend(text for _, text in sorted(rows, key=lambda r: r[0]))
    for attempt, error in rec.failed_attempts():
        lines.append(f"   attempt {attempt} failed: {error}")
    lines.append("   " + summary(entry))
    return lines


def _row(rec: RecoveryView, phase: str, window: tuple[float, float], runs: list[PhaseRun]) -> str:
    detail = _DETAIL[phase]
    if phase == "select_checkpoint":
        replaced = "lost node replaced, " if rec.trigger == "peer_lost" else ""
        chosen = "version chosen" if rec.version is None else f"version {rec.version} chosen"
        detail = f"workers stopped, {replaced}holdings gathered, {chosen}"
    if phase in ("fetch", "restore"):
        nbytes = rec.nbytes(phase)
        sources = sorted({r.source for r in runs if r.source})
        detail = f"{'/'.join(sources) or '?'}, {mib(nbytes)}"
        earlier = sorted({r.attempt for r in runs if r.attempt != rec.attempts})
        if phase == "fetch" and earlier:
            detail += f" (in attempt {', '.join(map(str, earlier))}; kept in RAM)"
        if phase == "restore" and len(sources) > 1:
            detail += f" ({sources_text(rec)})"
    errors = [r.error for r in runs if r.error]
    if errors:
        detail += f"; error: {errors[0]}"
    return (
        f"   {phase:<19} {window[0] - rec.start:>+7.2f}s {window[1] - window[0]:>7.2f}s"
        f"  {nodes_text(r.node for r in runs):<10} {detail}"
    )


def summary(entry: Entry) -> str:
    rec = entry.recovery
    assert rec is not None
    inj = entry.injection
    parts = [f"total {rec.seconds:.2f} s from the failure to training resumed ({rec.outcome})"]
    if inj is not None and inj.resumed_step is not None:
        redone = inj.step - inj.resumed_step if inj.resumed_step >= 0 else inj.step + 1
        parts.append(f"restored version {inj.resumed_step}, about {max(redone, 0)} steps redone")
    elif rec.version is not None:
        parts.append(f"restored version {rec.version}")
    parts.append(f"{rec.tries} attempt{'s' if rec.tries != 1 else ''}")
    return "; ".join(parts)


def render(result: DemoResult) -> str:
    """The whole closing report."""
    lines = [""]
    n = len(result.recoveries)
    lines.append(
        f"Recovery timeline (from the agents' OpenTelemetry spans: {n} recovery"
        f" trace{'s' if n != 1 else ''}; 'from' counts from when the failure began)"
    )
    if not result.entries:
        lines.append("   (no fault injected, no recovery traced)")
    for number, entry in enumerate(result.entries, 1):
        lines.append("")
        lines.extend(render_entry(entry, number))
    lines.append("")
    lines.append("Checks")
    for check in result.checks:
        lines.append(f"   {'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    if result.forward_errors:
        lines.append(f"   note: forwarding to your collector failed: {result.forward_errors[0]}")
    lines.append("")
    if result.timeline_path is not None:
        lines.append(f"Timeline picture: {result.timeline_path}")
    lines.append(f"Logs, policy and parameters: {result.run_dir}")
    lines.append(f"RESULT: {'PASS' if result.ok else 'FAIL'}")
    return "\n".join(lines) + "\n"
