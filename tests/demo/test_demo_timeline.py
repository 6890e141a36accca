"""Recoveries rebuilt from spans, paired with the faults, checked, reported and drawn."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
from spans import recovery, span

from supervise._demo.checks import checks
from supervise._demo.compare import Comparison
from supervise._demo.config import DemoConfig, FaultKind
from supervise._demo.faults import Injection
from supervise._demo.picture import write_html
from supervise._demo.report import render, render_entry
from supervise._demo.result import DemoResult, match
from supervise._demo.timeline import recoveries
from supervise.policy import Policy


def test_one_trace_is_one_recovery_with_its_phases() -> None:
    (rec,) = recoveries(recovery("a" * 32, start=100.0, trigger="peer_lost", nodes=3, fetch_node=2))
    assert rec.trigger == "peer_lost" and rec.node == 0 and rec.outcome == "completed"
    assert rec.version == 40 and rec.reason == "rank=1" and rec.tries == 1
    assert rec.detected_at == 100.01
    assert rec.sources() == {0: "local", 1: "local", 2: "peer"}
    assert rec.nbytes("restore") == 3 << 20 and rec.nbytes("fetch") == 100
    window = rec.window("restore")
    assert window is not None and window[1] - window[0] < 0.06
    assert [r.node for r in rec.runs("resume")] == [0, 1, 2]
    assert abs(rec.seconds - (rec.end - rec.start)) < 1e-9


def test_spans_of_other_kinds_and_traces_are_kept_apart() -> None:
    spans = recovery("a" * 32, start=10.0, trigger="worker_exit")
    spans += recovery("b" * 32, start=5.0, trigger="nan")
    spans.append(span("supervise.snapshot.capture", "c" * 32, 1.0, 2.0))
    views = recoveries(spans)
    assert [v.trigger for v in views] == ["nan", "worker_exit"]  # oldest first


def test_a_recovery_whose_root_never_arrived_is_unfinished() -> None:
    spans = [
        s for s in recovery("a" * 32, start=1.0, trigger="nan") if s.name != "supervise.recovery"
    ]
    (rec,) = recoveries(spans)
    assert rec.outcome == "unfinished" and rec.node is None and rec.trigger == "nan"


def injection(index: int, kind: FaultKind, at: float, *, resumed: float | None) -> Injection:
    inj = Injection(index, kind, 1, 1, (4242,), at, 42, 1, f"{kind.value} it", limit_s=100.0)
    if resumed is not None:
        inj.resumed_at, inj.resumed_generation, inj.resumed_step = resumed, 2, 40
    return inj


def test_faults_pair_with_the_first_recovery_detected_after_them() -> None:
    views = recoveries(
        recovery("a" * 32, start=5.0, trigger="worker_exit")  # before any fault: unplanned
        + recovery("b" * 32, start=20.0, trigger="worker_exit")
        + recovery("c" * 32, start=39.0, trigger="heartbeat_timeout", detect_s=10.0)
    )
    crash = injection(0, FaultKind.CRASH, 20.0, resumed=24.0)
    hang = injection(1, FaultKind.HANG, 39.5, resumed=55.0)  # detected 10 s after its start
    entries = match([crash, hang], views)
    assert [(e.injection is not None, e.recovery is not None) for e in entries] == [
        (False, True),
        (True, True),
        (True, True),
    ]
    assert entries[1].recovery is not None and entries[1].recovery.trace_id == "b" * 32
    assert entries[2].recovery is not None and entries[2].recovery.trace_id == "c" * 32


def result_for(tmp_path: Path, *, exact: bool, resumed: bool = True) -> DemoResult:
    config = DemoConfig(out_dir=tmp_path, nodes=2, faults="crash,node_loss", steps=600)
    result = DemoResult(config, Policy.default(), tmp_path / "p.toml", tmp_path, 0.0)
    result.injections = [
        injection(0, FaultKind.CRASH, 20.0, resumed=24.0),
        injection(1, FaultKind.NODE_LOSS, 40.0, resumed=50.0 if resumed else None),
    ]
    result.recoveries = recoveries(
        recovery("a" * 32, start=20.0, trigger="worker_exit")
        + recovery("b" * 32, start=40.0, trigger="peer_lost", detect_s=2.0, fetch_node=1)
    )
    result.entries = match(result.injections, result.recoveries)
    result.training_finished_at = 60.0 if resumed else None
    result.comparison = Comparison(
        exact, 8, 1000, "ab" * 32, () if exact else ("w: 1 of 9 differ",)
    )
    result.processes_seen = 12
    result.checks = checks(result)
    return result


def test_checks_pass_only_when_everything_held(tmp_path: Path) -> None:
    good = result_for(tmp_path, exact=True)
    assert good.ok, [c for c in good.checks if not c.ok]
    inexact = result_for(tmp_path, exact=False)
    assert not inexact.ok
    failed = [c.name for c in inexact.checks if not c.ok]
    assert failed == ["final parameters equal the failure-free run bit for bit"]
    stuck = result_for(tmp_path, exact=True, resumed=False)
    assert {c.name for c in stuck.checks if not c.ok} >= {
        "every fault injected, training resumed after each",
        "no hang past the policy's timeouts",
        "training finished on every node (every agent exited 0)",
    }


def test_report_shows_phases_sources_and_the_verdict(tmp_path: Path) -> None:
    text = render(result_for(tmp_path, exact=True))
    assert "#1 worker crash at step 42: crash it" in text
    assert "#2 node loss at step 42: node_loss it" in text
    assert re.search(r"fetch\s+\+2\.20s\s+0\.10s\s+node 1\s+peer", text)
    assert "local/peer, 2.0 MiB (local (node 0), peer (node 1))" in text
    assert re.search(r"\(workers starting\)\s+\+0\.21s\s+3\.00s", text)
    assert "none: every shard was in its node's RAM" in text
    assert "holdings gathered, version 40 chosen" in text
    assert text.rstrip().endswith("RESULT: PASS")
    assert "RESULT: FAIL" in render(result_for(tmp_path, exact=False))


def test_picture_is_one_self_contained_html_file(tmp_path: Path) -> None:
    result = result_for(tmp_path, exact=True)
    result.entries[0].injection.action = "<kill & run>"  # type: ignore[union-attr]
    path = write_html(result, tmp_path / "timeline.html")
    page = path.read_text()
    assert page.count("<svg") == 3  # the run, and one chart per recovery
    assert "&lt;kill &amp; run&gt;" in page and "<kill & run>" not in page
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch
    assert "<script" not in page
    assert "peer_lost" in page and "workers starting" in page


def test_a_fetch_in_a_failed_attempt_still_names_the_peer_as_the_source() -> None:
    spans = []
    for s in recovery("a" * 32, start=1.0, trigger="peer_lost", nodes=2, fetch_node=1):
        attributes = dict(s.attributes)
        if s.name not in ("supervise.recovery.detect", "supervise.recovery.fetch"):
            attributes["supervise.attempt"] = 2  # the fetch was attempt 1's, which then failed
        if s.name == "supervise.recovery.restore":
            attributes["supervise.snapshot.source"] = "local"  # from the fetched copy in RAM
        spans.append(attrs.evolve(s, attributes=attributes))
    (rec,) = recoveries(spans)
    assert rec.attempts == 2 and rec.tries == 2
    assert rec.sources() == {0: "local", 1: "peer"}
    assert rec.nbytes("fetch") == 100 and rec.window("fetch") is not None
    assert rec.failed_attempts() == [(1, "superseded by a new attempt")]
    text = "\n".join(render_entry(match([], [rec])[0], 1))
    assert "fetch" in text and "peer, 0.0 MiB (in attempt 1; kept in RAM)" in text
    assert "attempt 1 failed" in text
