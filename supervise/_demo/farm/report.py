"""The farm demo's closing report as text: per task its states, attempts and nodes, the node
loss and the takeovers, then the checks."""

from __future__ import annotations

from supervise._demo.farm.pipeline import STAGES
from supervise._demo.farm.records import StateChange, StepRun, TaskView
from supervise._demo.farm.result import FarmResult


def _t(result: FarmResult, at: float) -> str:
    return f"{at - result.started_at:6.2f}"


def _why(change: StateChange) -> str:
    detail = change.detail if len(change.detail) <= 40 else change.detail[:39] + "…"
    why = ": ".join(x for x in (change.reason, detail) if x)
    return f" ({why})" if why else ""


def _run_text(result: FarmResult, run: StepRun) -> str:
    end = "lost" if run.done is None else f"{run.done - result.started_at:.2f}"
    return f"{run.step} {run.started - result.started_at:.2f}-{end}"


def render_task(result: FarmResult, task: TaskView) -> list[str]:
    """One task: a header, its state changes, its attempts (node, worker, steps run)."""
    attempts = task.by_attempt()
    nodes = " -> ".join(f"node {n}" for n in task.nodes) or "-"
    verdict = {True: "result equal", False: "RESULT DIFFERS", None: "not compared"}[task.equal]
    lines = [
        f"task {task.task_id} (seed {task.seed}): {task.state}, {len(attempts)} worker"
        f" attempt{'s' if len(attempts) != 1 else ''}, {nodes}; {verdict}"
    ]
    if task.error:
        lines.append(f"   error: {task.error}")
    if task.states:
        moves = "  ".join(f"{_t(result, s.at).strip()} {s.state}{_why(s)}" for s in task.states)
        lines.append(f"   states: {moves}")
    done_before: set[str] = set()
    for (attempt, node, pid), runs in attempts.items():
        ran = {r.step for r in runs}
        replayed = [s for s in STAGES if s in done_before and s not in ran]
        kept = f"  (from the journal: {', '.join(replayed)})" if replayed else ""
        steps = "  ".join(_run_text(result, r) for r in runs)
        lines.append(f"   attempt {attempt} on node {node}, worker pid {pid}: {steps}{kept}")
        done_before |= {r.step for r in runs if r.done is not None}
    for t in result.takeovers:
        if t.task == task.task_id:
            within = "within" if t.seconds <= result.takeover_target else "OVER"
            lines.append(
                f"   takeover: {t.seconds:.2f} s from the loss of node {t.lost_node} to"
                f" '{t.step}' running on node {t.node} ({within} the target"
                f" peer_timeout + 1 s = {result.takeover_target:g} s)"
            )
    return lines


def render(result: FarmResult) -> str:
    """The whole closing report."""
    lines = ["", "Task timeline (seconds since the demo started; steps: start-end)"]
    loss = result.loss
    if loss is not None:
        lines.append(
            f"   node {loss.rank} lost at {_t(result, loss.at).strip()} s: kill -9 of agent pid"
            f" {loss.agent_pid} and {len(loss.pids)} processes under it"
            f" ({', '.join(map(str, loss.pids)) or 'none'})"
        )
    if not result.tasks:
        lines.append("   (no task ran)")
    for task in result.tasks:
        lines.append("")
        lines.extend(render_task(result, task))
    if result.takeovers:
        worst = max(t.seconds for t in result.takeovers)
        lines.append("")
        lines.append(
            f"Takeover: {worst:.2f} s at most from the kill to the lost step running again"
            f" elsewhere (peer_timeout {result.peer_timeout:g} s; target"
            f" <= {result.takeover_target:g} s)"
        )
    if result.farm_started_at is not None and result.farm_finished_at is not None:
        lines.append(
            f"Farm run: {result.farm_finished_at - result.farm_started_at:.1f} s from the first"
            f" submit to the last result"
        )
    lines.append("")
    lines.append("Checks")
    for check in result.checks:
        lines.append(f"   {'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    lines.append("")
    if result.timeline_path is not None:
        lines.append(f"Timeline picture: {result.timeline_path}")
    lines.append(f"Logs, effects and results: {result.run_dir}")
    lines.append(f"RESULT: {'PASS' if result.ok else 'FAIL'}")
    return "\n".join(lines) + "\n"
