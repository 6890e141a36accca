"""Cost of telemetry per traced operation: off (no OTEL_*) vs on (OTLP/HTTP to a real rotel).

Side by side in one run: an empty ``with`` block (the floor), a ``snapshot_span`` and a whole
five-phase ``RecoveryTrace``, each with telemetry off and on. Export runs on the SDK's batch
thread, so "on" measures what the traced code itself pays. Writes its section of
benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/telemetry_overhead.py [--iterations 20000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from supervise._testing import OtelCollector
from supervise.telemetry import RecoveryTrace, Telemetry, TelemetryConfig, snapshot_span

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- telemetry_overhead:begin -->", "<!-- telemetry_overhead:end -->"


def per_call_us(fn: Callable[[], None], iterations: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` mean microseconds per call (best: least disturbed by neighbours)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter() - start) / iterations)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    args = parser.parse_args()
    n = args.iterations

    with tempfile.TemporaryDirectory() as tmp, OtelCollector(Path(tmp)) as collector:
        off = Telemetry.create(TelemetryConfig.from_env({}))
        on = Telemetry.create(
            TelemetryConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint}),
            rank=0,
        )

        def empty() -> None:
            with contextlib.nullcontext():
                pass

        def span(tel: Telemetry) -> Callable[[], None]:
            def run() -> None:
                with snapshot_span("capture", telemetry=tel, snapshot_step=10) as op:
                    op.set(bytes=1 << 20)

            return run

        def recovery(tel: Telemetry) -> Callable[[], None]:
            def run() -> None:
                rt = RecoveryTrace.begin("worker_exit", rank=0, telemetry=tel)
                for phase in ("detect", "select_checkpoint", "fetch", "restore", "resume"):
                    with rt.phase(phase):
                        pass
                rt.event("detected")
                rt.end("completed")

            return run

        rows = [
            ("empty `with` block (floor)", per_call_us(empty, n), None),
            ("snapshot_span, telemetry off", per_call_us(span(off), n), None),
            ("snapshot_span, telemetry on", per_call_us(span(on), n), None),
            ("RecoveryTrace, 5 phases, off", per_call_us(recovery(off), n // 10), None),
            ("RecoveryTrace, 5 phases, on", per_call_us(recovery(on), n // 10), None),
        ]
        on.shutdown(timeout_s=60)
        received = len(collector.spans())

    floor = rows[0][1]
    lines = [
        BEGIN,
        "## Telemetry overhead (`benchmarks/telemetry_overhead.py`)",
        "",
        "What the traced code pays per operation, best of 5 runs of the mean over "
        f'{n} iterations (recoveries: {n // 10}); "on" exports OTLP/HTTP to a real rotel on '
        "loopback through the SDK's batch thread. The collector received "
        f"{received} spans in this run (the batch processor drops spans beyond its queue of "
        "2048 when a burst outruns export: this benchmark's bursts are far denser than real "
        "recoveries or snapshots).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {platform.system()}; shared with other work (noisy).",
        "",
        "| operation | µs per call | x empty `with` |",
        "| --- | ---: | ---: |",
    ]
    for name, us, _ in rows:
        lines.append(f"| {name} | {us:.2f} | {us / floor:.0f} |")
    step_ms = 167.0  # one training step of the 1.21 B-param reference model (REFERENCE.md)
    on_share = rows[2][1] / 1000 / step_ms
    off_share = rows[1][1] / 1000 / step_ms
    lines += [
        "",
        f"With telemetry on, a traced capture costs {on_share:.3%} of one {step_ms:g} ms"
        f" training step of the reference model ({off_share:.4%} off); a traced recovery"
        f" of five phases costs {rows[4][1] / 1000:.2f} ms.",
        "",
        "Reproduce: `.venv/bin/python benchmarks/telemetry_overhead.py`",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
