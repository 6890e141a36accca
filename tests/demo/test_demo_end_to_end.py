"""`supervise demo --quick` end to end: real agents, real workers, every fault, the timeline,
the bit-exact check; the user's own OTLP collector gets the traces too. Every process the
demo starts is tracked by PID (with its start time) and killed by PID if anything is left."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervise._testing import PidBook, wait_until
from supervise.telemetry import RECOVERY_SPAN
from supervise.telemetry.receiver import OtlpSink

DEMO_LIMIT_S = 420  # the quick demo takes about 1.5 min; generous for a loaded CI machine


class Watched:
    """A process and every descendant it ever had (scanned every 0.2 s), killed by PID."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.book = PidBook()
        self.book.add(proc.pid, "demo")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._scan, daemon=True)
        self._thread.start()

    def _scan(self) -> None:
        while not self._stop.wait(0.2):
            self.book.add_descendants(self.proc.pid, "demo")

    def stop_watching(self) -> None:
        self._stop.set()
        self._thread.join()

    def kill_everything(self) -> None:
        self.stop_watching()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the demo stops its agents in order
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.book.kill_survivors()


@contextlib.contextmanager
def demo(argv: list[str], *, env: dict[str, str], output: Path) -> Iterator[Watched]:
    with open(output, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervise", "demo", *argv],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
        watched = Watched(proc)
        try:
            yield watched
        finally:
            watched.kill_everything()


def block(report: str, title: str) -> str:
    """The timeline entry whose title contains ``title`` (up to the next blank line)."""
    start = report.index(title, report.index("Recovery timeline"))
    end = report.find("\n\n", start)
    return report[start : end if end >= 0 else None]


@pytest.mark.slow
def test_the_quick_demo_survives_every_fault_bit_exact_and_leaves_nothing(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    output = tmp_path / "output.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with OtlpSink() as users_collector:  # the user's own collector, named by OTEL_*
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = users_collector.endpoint
        with demo(["--quick", "--out", str(out_dir)], env=env, output=output) as watched:
            try:
                code = watched.proc.wait(DEMO_LIMIT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the quick demo ran past {DEMO_LIMIT_S} s:\n{output.read_text()}")
            watched.stop_watching()
            report = output.read_text()
            assert code == 0, report
            survivors = watched.book.survivors()
            assert survivors == [], f"left running: {survivors}\n{report}"
            assert len(watched.book) >= 10  # demo, agents, guards, workers, reference...
        users_roots = users_collector.spans(RECOVERY_SPAN)

    assert "RESULT: PASS" in report
    for line in (
        "every fault injected, training resumed after each: 4/4 recovered",
        "every recovery is one completed trace in the agents' spans: 4/4",
        "final parameters equal the failure-free run bit for bit",
        "no orphan process",
        "no hang past the policy's timeouts",
    ):
        assert f"PASS  {line}" in report, report

    crash = block(report, "worker crash at step")
    assert "trigger worker_exit" in crash and "local" in crash
    hang = block(report, "worker hang at step")
    assert "trigger heartbeat_timeout" in hang
    node_loss = block(report, "node loss at step")
    # the replacement agent, RAM empty, fetched its shard from its group peer
    assert re.search(r"^   fetch +\+[\d.]+s .* peer, [\d.]+ MiB", node_loss, re.M), node_loss
    nan = block(report, "NaN loss at step")
    assert "trigger nan" in nan

    picture = Path(report.split("Timeline picture: ", 1)[1].split("\n", 1)[0])
    assert picture == out_dir.resolve() / "timeline.html"
    html = picture.read_text()
    assert "<svg" in html and "node loss" in html and "RESULT: PASS" in html
    spans = [json.loads(line) for line in (out_dir / "spans.jsonl").read_text().splitlines()]
    roots = [s for s in spans if s["name"] == RECOVERY_SPAN]
    assert len(roots) == 4
    # the user's collector got the same recovery traces
    assert {s.trace_id for s in users_roots} == {s["trace_id"] for s in roots}


def test_bad_usage_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for argv, needle in (
        (["--nodes", "1"], "--nodes 1"),
        (["--faults", "crash,meteor"], "--faults 'meteor'"),
        (["--policy", str(tmp_path / "missing.toml")], "missing.toml"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "supervise", "demo", "--out", str(tmp_path / "d"), *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
        assert proc.stdout == ""


def test_a_directory_that_is_not_the_demos_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "supervise", "demo", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not a previous demo's directory" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_sigterm_stops_every_agent_and_worker_and_reports(tmp_path: Path) -> None:
    output = tmp_path / "output.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    argv = ["--quick", "--out", str(tmp_path / "demo")]
    with demo(argv, env=env, output=output) as watched:

        def started() -> bool:
            assert watched.proc.poll() is None, output.read_text()
            return "training started" in output.read_text()

        wait_until(
            started,
            what="the demo to report training started",
            timeout_s=DEMO_LIMIT_S,
            interval_s=0.2,
            details=output.read_text,
        )
        watched.proc.send_signal(signal.SIGTERM)
        code = watched.proc.wait(120)
        watched.stop_watching()
        report = output.read_text()
        assert code == 130, report
        assert watched.book.survivors() == [], report
        assert len(watched.book) >= 5  # the demo, agents, their workers and guards
    assert "SIGTERM: stopping every agent and worker" in report
    assert "interrupted by SIGTERM" in report
    assert "PASS  no orphan process" in report
    assert "RESULT: FAIL" in report
