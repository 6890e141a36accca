"""The farm demo's picture: one self-contained HTML file with inline SVG (no script).

A lane per task: each step execution as a bar colored by the node that ran it, a step cut by
the node loss hatched in red, the kill as a red line, the takeover as a band from the kill to
the lost step running again; below, the text report. Drawn with the training demo's
primitives, so both pictures look alike."""

from __future__ import annotations

from pathlib import Path

from supervise._demo.farm.report import render
from supervise._demo.farm.result import FarmResult
from supervise._demo.picture import _LEFT, COLORS, _Axis, _e, _Svg

NODE_COLORS = (
    "#1f77b4",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#17becf",
    "#bcbd22",
    "#e377c2",
)
CUT = "#d62728"
TAKEOVER = "#fbe3e3"


def _node_color(node: str) -> str:
    try:
        return NODE_COLORS[int(node) % len(NODE_COLORS)]
    except ValueError:
        return "#7f7f7f"


def _end(result: FarmResult) -> float:
    times = [result.started_at + 1.0, result.farm_finished_at or 0.0]
    times += [r.done or r.started for r in result.runs]
    if result.loss is not None:
        times.append(result.loss.at)
    return max(times)


def overview(result: FarmResult) -> str:
    """The whole run: a lane per task, its step executions on their nodes."""
    tasks = result.tasks
    end = _end(result)
    axis = _Axis(result.started_at, max(end - result.started_at, 1.0) * 1.02)
    lane, top = 30.0, 40.0
    svg = _Svg(top + lane * max(len(tasks), 1) + 44)
    height = lane * max(len(tasks), 1) + 6
    svg.grid(axis, y=top - 6, height=height)
    loss = result.loss
    if loss is not None:
        for t in result.takeovers:
            row = next((i for i, v in enumerate(tasks) if v.task_id == t.task), None)
            if row is not None:
                svg.rect(
                    axis.x(loss.at),
                    top + row * lane,
                    w=axis.w(t.seconds),
                    h=lane - 4,
                    fill=TAKEOVER,
                    tip=f"takeover of {t.task}: {t.seconds:.2f} s",
                )
    for row, task in enumerate(tasks):
        y = top + row * lane
        svg.text(_LEFT - 8, y + lane / 2 + 2, task.task_id, anchor="end", bold=True)
        for run in task.runs:
            cut = run.done is None
            stop = (loss.at if loss is not None and cut else run.done) or run.started
            x, w = axis.x(run.started), axis.w(stop - run.started)
            tip = (
                f"{run.key} attempt {run.attempt} on node {run.node} (pid {run.pid}):"
                f" {'cut by the node loss' if cut else f'{stop - run.started:.2f} s'}"
            )
            svg.rect(
                x, y + 4, w=w, h=lane - 12, fill=CUT if cut else _node_color(run.node), tip=tip
            )
            if w > 6.2 * len(run.step) + 4:
                svg.text(x + 3, y + lane / 2 + 2, run.step, size=10, fill="#fff")
    if loss is not None:
        x = axis.x(loss.at)
        svg.vline(x, top - 6, top + height, stroke=CUT)
        svg.marker(x, top - 2, fill=COLORS["fault"], tip=f"kill -9 of node {loss.rank}")
        svg.text(x + 7, top - 10, f"node {loss.rank} lost (kill -9)", size=10, fill=CUT, bold=True)
    x = 10.0
    nodes = sorted({r.node for r in result.runs}, key=lambda n: (len(n), n))
    for node in nodes:
        svg.rect(x, svg.height - 21, w=12, h=10, fill=_node_color(node))
        svg.text(x + 16, svg.height - 12, f"node {node}", size=10)
        x += 70
    for color, name in ((CUT, "step cut by the loss"), (TAKEOVER, "takeover")):
        svg.rect(x, svg.height - 21, w=12, h=10, fill=color)
        svg.text(x + 16, svg.height - 12, name, size=10)
        x += 30 + 6.5 * len(name)
    return svg.render()


def write_html(result: FarmResult, path: Path) -> Path:
    """Write the picture to ``path``; returns it."""
    verdict = "PASS" if result.ok else "FAIL"
    color = "#1a7f37" if result.ok else "#b2182b"
    config = result.config
    body = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>supervise demo --tasks: task timeline</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}}
h1{{font-size:20px}} h2{{font-size:16px;margin-top:28px}}
pre{{background:#f6f8fa;padding:12px;font-size:12px;overflow-x:auto}}
.verdict{{color:{color};font-weight:bold}}</style></head><body>
<h1>supervise demo --tasks: task timeline <span class="verdict">{verdict}</span></h1>
<p>A farm of {config.nodes} node agents on one machine runs {config.tasks} five-step pipelines
(ingest, clean, features, train, evaluate; about {config.step_delay:g} s a step); one node is
lost (kill -9 of its agent and workers) while it runs a step. Each bar is one execution of a
step, colored by the node that ran it (from the files the steps leave, keyed by their
idempotency key); hover over a bar for its numbers.</p>
<h2>Every step execution (seconds since the demo started)</h2>{overview(result)}
<h2>Report</h2><pre>{_e(render(result))}</pre>
</body></html>
"""
    path.write_text(body, encoding="utf-8")
    return path
