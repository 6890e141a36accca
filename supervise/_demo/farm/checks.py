"""The farm demo's promises, each checked against what the run produced, with its evidence."""

from __future__ import annotations

from supervise._demo.farm.records import executions, missing, reruns
from supervise._demo.farm.result import FarmResult
from supervise._demo.result import Check


def farm_checks(result: FarmResult) -> list[Check]:
    """Struck mid-step, taken over, completed, equal, never re-run, no orphans."""
    return [
        _struck(result),
        _taken_over(result),
        _completed(result),
        _equal(result),
        _once(result),
        _no_orphans(result),
    ]


def _rel(result: FarmResult, t: float) -> str:
    return f"+{t - result.started_at:.1f} s"


def _struck(result: FarmResult) -> Check:
    loss = result.loss
    name = "the node loss struck a task mid-step"
    if loss is None:
        return Check(name, False, result.failure or "no node was killed")
    cut = [r for r in result.runs if r.node == str(loss.rank) and r.done is None]
    what = ", ".join(f"{r.task} in '{r.step}'" for r in cut) or "no step cut"
    return Check(
        name,
        bool(cut),
        f"node {loss.rank} killed at {_rel(result, loss.at)} (agent pid {loss.agent_pid} and"
        f" {len(loss.pids)} processes under it): {what}",
    )


def _taken_over(result: FarmResult) -> Check:
    name = "every task of the lost node resumed on another node at the step it lost"
    loss = result.loss
    if loss is None or not loss.tasks:
        return Check(name, False, "no task ran on the lost node")
    by_task = {t.task: t for t in result.takeovers}
    parts, ok = [], True
    for task in loss.tasks:
        t = by_task.get(task)
        if t is None:
            ok = False
            parts.append(f"{task}: never resumed")
            continue
        ok = ok and t.step == t.lost_step
        kept = f"; {', '.join(t.replayed)} from the journal" if t.replayed else ""
        parts.append(f"{task}: '{t.step}' on node {t.node} after {t.seconds:.2f} s{kept}")
    return Check(name, ok, "; ".join(parts))


def _completed(result: FarmResult) -> Check:
    done = [t for t in result.tasks if t.state == "completed" and t.error is None]
    bad = [f"{t.task_id} {t.state}: {t.error}" for t in result.tasks if t not in done]
    detail = f"{len(done)}/{result.config.tasks} completed"
    if bad:
        detail += f" ({bad[0]})"
    return Check("every task completed on the farm", len(done) == result.config.tasks, detail)


def _equal(result: FarmResult) -> Check:
    equal = [t for t in result.tasks if t.equal]
    unequal = [t.task_id for t in result.tasks if t.equal is False]
    detail = f"{len(equal)}/{result.config.tasks} equal (numpy arrays bit for bit)"
    if unequal:
        detail += f"; differs: {', '.join(unequal)}"
    return Check(
        "every result equals a failure-free run (in-process, no farm)",
        len(equal) == result.config.tasks,
        detail,
    )


def _once(result: FarmResult) -> Check:
    counts = executions(result.runs)
    again = reruns(result.runs)
    never = missing(result.runs, result.config.task_ids)
    twice = [k for k, (_s, finished) in counts.items() if finished > 1]
    cut = sorted(k for k, (started, finished) in counts.items() if started > finished)
    ok = not (again or never or twice)
    detail = f"{sum(1 for _s, f in counts.values() if f == 1)} steps finished once each"
    if cut:
        detail += f"; executions cut by the loss: {', '.join(cut)}"
    if again or twice:
        detail += f"; RAN AGAIN after finishing: {', '.join(sorted(set(again + twice)))}"
    if never:
        detail += f"; never finished: {', '.join(never[:3])}"
    return Check("finished steps never re-ran (executions counted by idempotency key)", ok, detail)


def _no_orphans(result: FarmResult) -> Check:
    left = result.survivors
    if not left:
        return Check(
            "no orphan process",
            True,
            f"all {result.processes_seen} processes the demo saw are gone",
        )
    named = ", ".join(f"{s.pid} ({s.role})" for s in left[:5])
    return Check("no orphan process", False, f"still running: {named} (killed now)")
