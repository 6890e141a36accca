"""The timeline picture: one self-contained HTML file with inline SVG (no script, no network).

On top, the whole run: a lane per node with its training generations, every fault where it
struck, every recovery as a band with its phases on the nodes that ran them. Below, one chart
per recovery: each phase on each node, to scale, with its duration; then the text report.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

import attrs

from supervise._demo.cluster import AgentProcess
from supervise._demo.report import render, startup_gap, title
from supervise._demo.result import DemoResult, Entry
from supervise._demo.timeline import PHASES, PhaseRun, RecoveryView

COLORS = {
    "detect": "#d62728",
    "select_checkpoint": "#ff7f0e",
    "fetch": "#9467bd",
    "restore": "#1f77b4",
    "resume": "#2ca02c",
    "starting": "#c7c7c7",
    "training": "#a6dba0",
    "spawn": "#e5e5e5",
    "fault": "#b2182b",
    "band": "#fbe3e3",
}
_LABELS = {"training": "training", "starting": "workers starting", "spawn": "workers starting"}
_LEFT = 150  # room for lane labels
_WIDTH = 1100  # the time axis
_CHAR = 6.2  # average width of a 10 px character, to keep labels inside the picture


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


@attrs.frozen(slots=True)
class _Axis:
    """Seconds to x: ``t0`` at the left edge of the axis, ``span`` seconds across it."""

    t0: float
    span: float

    @property
    def scale(self) -> float:
        return _WIDTH / self.span

    def x(self, t: float) -> float:
        return _LEFT + (t - self.t0) * self.scale

    def w(self, seconds: float) -> float:
        return max(0.0, seconds) * self.scale


class _Svg:
    """A few SVG primitives, escaped, accumulated into one element."""

    def __init__(self, height: float) -> None:
        self.width = _LEFT + _WIDTH + 20
        self.height = height
        self.parts: list[str] = []

    def rect(self, x: float, y: float, *, w: float, h: float, fill: str, tip: str = "") -> None:
        inner = f"<title>{_e(tip)}</title>" if tip else ""
        self.parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 1.0):.1f}" height="{h:.1f}"'
            f' fill="{fill}">{inner}</rect>'
        )

    def text(
        self,
        x: float,
        y: float,
        text: str,
        *,
        size: int = 11,
        anchor: str = "start",
        fill: str = "#222",
        bold: bool = False,
    ) -> None:
        weight = ' font-weight="bold"' if bold else ""
        self.parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"'
            f' fill="{fill}"{weight}>{_e(text)}</text>'
        )

    def vline(self, x: float, y1: float, y2: float, *, stroke: str, dash: str = "") -> None:
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<line x1="{x:.1f}" y1="{y1:.1f}" x2="{x:.1f}" y2="{y2:.1f}" stroke="{stroke}"{d}/>'
        )

    def marker(self, x: float, y: float, *, fill: str, tip: str) -> None:
        path = f'<path d="M{x:.1f},{y:.1f} l-6,-10 h12 z" fill="{fill}">'
        self.parts.append(f"{path}<title>{_e(tip)}</title></path>")

    def label(self, x_end: float, x_start: float, y: float, text: str) -> None:
        """``text`` right of a bar from ``x_start`` to ``x_end``; inside it, or left of it,
        when the picture has no room on the right."""
        width = _CHAR * len(text)
        if x_end + 4 + width <= _LEFT + _WIDTH:
            self.text(x_end + 4, y, text, size=10, fill="#444")
        elif x_end - x_start >= width + 8:
            self.text(x_start + 4, y, text, size=10, fill="#222")
        else:
            self.text(x_start - 4, y, text, size=10, fill="#444", anchor="end")

    def grid(self, axis: _Axis, *, y: float, height: float) -> None:
        step = _tick(axis.span)
        k = 0
        while k * step <= axis.span + 1e-9:
            x = _LEFT + k * step * axis.scale
            self.vline(x, y, y + height, stroke="#eeeeee")
            self.text(x, y + height + 14, f"{k * step:g} s", size=10, anchor="middle", fill="#666")
            k += 1

    def legend(self, x: float, y: float, keys: Iterable[str]) -> None:
        for key in keys:
            self.rect(x, y - 9, w=12, h=10, fill=COLORS[key])
            name = _LABELS.get(key, key)
            self.text(x + 16, y, name, size=10)
            x += 24 + 6.5 * len(name)

    def render(self) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}"'
            f' height="{self.height:.0f}" viewBox="0 0 {self.width} {self.height:.0f}"'
            ' font-family="system-ui, sans-serif">' + "".join(self.parts) + "</svg>"
        )


def _tick(span: float) -> float:
    for step in (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300):
        if span / step <= 12:
            return float(step)
    return 600.0


def _end_of_run(result: DemoResult) -> float:
    times = [result.started_at + 1.0, result.training_finished_at or 0.0]
    times += [r.end for r in result.recoveries]
    times += [i.resumed_at or i.at for i in result.injections]
    if result.cluster is not None:
        times += [a.log.finished_at or 0.0 for a in result.cluster.agents]
        times += [
            g.last_step_at or 0.0 for a in result.cluster.agents for g in a.log.generations.values()
        ]
    return max(times)


def overview(result: DemoResult) -> str:
    """The whole run: a lane per node with generations, faults, recoveries and phases."""
    nodes = result.config.nodes
    end = _end_of_run(result)
    axis = _Axis(result.started_at, (end - result.started_at) * 1.02)
    lane, top = 34.0, 40.0
    svg = _Svg(top + lane * nodes + 40)
    svg.grid(axis, y=top - 6, height=lane * nodes + 6)
    for number, entry in enumerate(result.entries, 1):
        rec = entry.recovery
        if rec is None:
            continue
        tip = f"#{number} {rec.trigger}: {rec.seconds:.2f} s from the failure to training resumed"
        svg.rect(axis.x(rec.start), top - 6, w=axis.w(rec.seconds), h=lane * nodes + 6,
                 fill=COLORS["band"], tip=tip)  # fmt: skip
        svg.text(axis.x(rec.start) + 2, top - 10, f"#{number} {rec.trigger}", size=10,
                 fill="#8c1a1a")  # fmt: skip
    for rank in range(nodes):
        y = top + rank * lane
        svg.text(_LEFT - 8, y + lane / 2 + 4, f"node {rank}", anchor="end", bold=True)
        if result.cluster is not None:
            for agent in (a for a in result.cluster.agents if a.rank == rank):
                _generations(svg, axis, result, agent, y=y, lane=lane, end=end)
        for entry in result.entries:
            if entry.recovery is None:
                continue
            for phase in PHASES:
                for run in _phase_runs(entry.recovery, phase):
                    if run.node == rank:
                        svg.rect(axis.x(run.start), y + lane - 12, w=axis.w(run.seconds), h=6,
                                 fill=COLORS[phase],
                                 tip=f"{phase} on node {rank}: {run.seconds:.3f} s")  # fmt: skip
        for inj in result.injections:
            if inj.node == rank:
                svg.marker(axis.x(inj.at), y + 10, fill=COLORS["fault"],
                           tip=f"{inj.kind.label}: {inj.action}")  # fmt: skip
                svg.text(axis.x(inj.at) + 7, y + 10, inj.kind.label, size=10,
                         fill=COLORS["fault"], bold=True)  # fmt: skip
    svg.legend(10, svg.height - 12, ["training", "starting", *PHASES])
    return svg.render()


def _generations(
    svg: _Svg, axis: _Axis, result: DemoResult, agent: AgentProcess, *, y: float, lane: float,
    end: float,
) -> None:  # fmt: skip
    """One agent's generations in its lane: workers starting (grey), then training (green)
    until the next failure, the end of training, or the agent's death."""
    stops = [r.start for r in result.recoveries]
    stops += [i.at for i in result.injections if i.node == agent.rank and agent.killed]
    gens = sorted(agent.log.generations.values(), key=lambda g: g.number)
    for k, gen in enumerate(gens):
        nxt = gens[k + 1].started_at if k + 1 < len(gens) else agent.log.finished_at
        ready = gen.resumed_at if gen.resumed_at is not None else (nxt or end)
        tip = f"generation {gen.number}: workers starting"
        svg.rect(axis.x(gen.started_at), y + 8, w=axis.w(ready - gen.started_at), h=lane - 16,
                 fill=COLORS["starting"], tip=tip)  # fmt: skip
        if gen.resumed_at is None:
            continue
        stop = min([s for s in stops if s > gen.resumed_at] + ([nxt] if nxt else []) + [end])
        tip = f"generation {gen.number}: training from step {gen.step + 1} ({agent.name})"
        svg.rect(axis.x(gen.resumed_at), y + 8, w=axis.w(stop - gen.resumed_at), h=lane - 16,
                 fill=COLORS["training"], tip=tip)  # fmt: skip
    if agent.incarnation and gens:
        svg.text(axis.x(gens[0].started_at) + 3, y + lane / 2 + 3,
                 f"replacement agent (pid {agent.pid})", size=9, fill="#333")  # fmt: skip


def _phase_runs(rec: RecoveryView, phase: str) -> list[PhaseRun]:
    """What the picture draws of ``phase``: the last attempt, and every attempt's fetch."""
    return rec.fetches() if phase == "fetch" else rec.runs(phase)


def recovery_chart(entry: Entry, number: int) -> str:
    """One recovery to scale: each phase on each node, and the workers' start between them."""
    rec = entry.recovery
    assert rec is not None
    rows: list[tuple[str, float, float, str, str]] = []
    for phase in PHASES:
        for run in _phase_runs(rec, phase):
            note = f"{run.seconds:.3f} s"
            if run.attempt != rec.attempts and phase != "detect":
                note += f" (attempt {run.attempt})"
            if run.source:
                note += f", {run.source}"
            if run.nbytes and phase in ("fetch", "restore"):
                note += f", {run.nbytes / 2**20:.1f} MiB"
            rows.append((f"{phase} (node {run.node})", run.start, run.end, COLORS[phase], note))
    gap = startup_gap(rec)
    if gap is not None:
        note = f"{gap[1] - gap[0]:.2f} s: workers starting, rendezvous (between spans)"
        rows.append(("workers starting", gap[0], gap[1], COLORS["spawn"], note))
    rows.sort(key=lambda r: (r[1], r[0]))
    axis = _Axis(rec.start, max(0.05, rec.seconds) * 1.05)
    row_h, top = 20.0, 26.0
    svg = _Svg(top + row_h * len(rows) + 30)
    svg.grid(axis, y=top - 4, height=row_h * len(rows) + 4)
    svg.text(_LEFT, 14, f"#{number} {rec.trigger}: {rec.seconds:.2f} s from the failure to"
             " training resumed", bold=True)  # fmt: skip
    if entry.injection is not None:
        svg.vline(axis.x(entry.injection.at), top - 4, top + row_h * len(rows),
                  stroke=COLORS["fault"], dash="4 3")  # fmt: skip
    for i, (label, start, stop, color, note) in enumerate(rows):
        y = top + i * row_h
        svg.text(_LEFT - 8, y + 14, label, anchor="end", size=10)
        svg.rect(axis.x(start), y + 3, w=axis.w(stop - start), h=row_h - 6, fill=color,
                 tip=f"{label}: {note}")  # fmt: skip
        svg.label(axis.x(stop), axis.x(start), y + 14, note)
    return svg.render()


def write_html(result: DemoResult, path: Path) -> Path:
    """Write the picture to ``path``; returns it."""
    verdict = "PASS" if result.ok else "FAIL"
    color = "#1a7f37" if result.ok else "#b2182b"
    charts = "".join(
        f"<h3>{_e(title(e, n))}</h3>{recovery_chart(e, n)}"
        for n, e in enumerate(result.entries, 1)
        if e.recovery is not None
    )
    faults = ", ".join(f.label for f in result.config.faults) or "none"
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>supervise demo: recovery timeline</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}
h1{{font-size:20px}} h2{{font-size:16px;margin-top:28px}} h3{{font-size:13px;margin:18px 0 4px}}
pre{{background:#f6f8fa;padding:12px;font-size:12px;overflow-x:auto}}
.verdict{{color:{color};font-weight:bold}}</style></head><body>
<h1>supervise demo: recovery timeline <span class="verdict">{verdict}</span></h1>
<p>{result.config.nodes} node agents on one machine, {result.config.steps} training steps;
faults: {_e(faults)}. The phases come from the agents' OpenTelemetry spans (one trace per
recovery); hover over a bar for its numbers.</p>
<h2>The whole run (seconds since the demo started)</h2>{overview(result)}
<h2>Each recovery to scale, from when the failure began (dashed: the demo's injection)</h2>
{charts or "<p>no recovery</p>"}
<h2>Report</h2><pre>{_e(render(result))}</pre>
</body></html>
"""
    path.write_text(body, encoding="utf-8")
    return path
