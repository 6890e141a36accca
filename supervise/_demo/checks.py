"""The demo's promises, each checked against what the run produced, with its evidence."""

from __future__ import annotations

from supervise._demo.result import Check, DemoResult


def checks(result: DemoResult) -> list[Check]:
    """Recovered, finished, traced, bit-exact, within the policy's timeouts, no orphans."""
    return [
        _recovered(result),
        _finished(result),
        _traced(result),
        _exact(result),
        _timely(result),
        _no_orphans(result),
    ]


def _recovered(result: DemoResult) -> Check:
    planned = len(result.config.faults)
    recovered = [i for i in result.injections if i.resumed_at is not None]
    detail = f"{len(recovered)}/{planned} recovered"
    if result.failure:
        detail += f" ({result.failure})"
    return Check(
        "every fault injected, training resumed after each",
        len(recovered) == planned == len(result.injections),
        detail,
    )


def _finished(result: DemoResult) -> Check:
    ok = result.training_finished_at is not None
    return Check(
        "training finished on every node (every agent exited 0)", ok, "yes" if ok else "no"
    )


def _traced(result: DemoResult) -> Check:
    planned = len(result.config.faults)
    completed = [
        e
        for e in result.entries
        if e.injection is not None and e.recovery is not None and e.recovery.outcome == "completed"
    ]
    return Check(
        "every recovery is one completed trace in the agents' spans",
        len(completed) == planned == len(result.injections),
        f"{len(completed)}/{planned} faults matched a completed supervise.recovery trace"
        f" ({len(result.recoveries)} recovery traces in all)",
    )


def _exact(result: DemoResult) -> Check:
    cmp = result.comparison
    return Check(
        "final parameters equal the failure-free run bit for bit",
        cmp is not None and cmp.equal,
        "not compared" if cmp is None else cmp.describe(),
    )


def _timely(result: DemoResult) -> Check:
    recovered = [i for i in result.injections if i.time_to_resume is not None]
    within = len(recovered) == len(result.injections) and all(
        (i.time_to_resume or 0.0) <= i.limit_s for i in recovered
    )
    slowest = max(recovered, key=lambda i: (i.time_to_resume or 0.0) / i.limit_s, default=None)
    if slowest is None:
        detail = "no fault recovered"
    else:
        detail = (
            f"slowest: the {slowest.kind.label} resumed after {slowest.time_to_resume:.1f} s"
            f" (the policy allows {slowest.limit_s:.0f} s)"
        )
    return Check("no hang past the policy's timeouts", within, detail)


def _no_orphans(result: DemoResult) -> Check:
    left = result.survivors
    if not left:
        return Check(
            "no orphan process",
            True,
            f"all {result.processes_seen} processes the demo saw are gone",
        )
    named = ", ".join(f"{s.pid} ({s.role})" for s in left[:5])
    return Check("no orphan process", False, f"still running: {named} (killed now)")
