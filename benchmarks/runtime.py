"""Runtime benchmark: supervise vs triotp 0.3.1, side by side in one run.

    python benchmarks/runtime.py            # builds .venv-triotp (Python 3.13) on first use

What is measured (each figure from a fresh process; sides interleaved; median over --reps):

- restart gap: a permanent child that raises at once, under a one_for_one supervisor with an
  intensity it never reaches; the median gap between successive starts (perf_counter at the
  top of the child). triotp: ``supervisor.start`` + ``child_spec``; supervise: ``Supervisor``.
- call throughput: sequential calls to an echo server from one task (the median of 5 timed
  chunks per process). triotp:
  ``gen_server.call(name, i)`` (its default: no timeout); supervise: ``ref.call(i)`` with its
  default 5 s timeout armed. Extra rows: triotp with ``timeout=5.0``, supervise with a plain-def
  handler.

Logging is part of both restart paths (triotp: logbook, supervise: structlog). By default
both are measured with their log records dropped before output (triotp's default: logbook with
no handler; supervise: structlog filtering below CRITICAL); ``--logs`` adds rows where both
write every record, with the traceback of each crash, to /dev/null.

triotp needs Python >= 3.13: it runs in its own venv (.venv-triotp, with trio 0.35.0 as ours)
into which supervise is installed too, so supervise is measured under both interpreters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRIOTP_VENV = ROOT / ".venv-triotp"


def _python313() -> str:
    """$TRIOTP_PYTHON, else the first Python 3.13 that runs (a pyenv shim on PATH may not)."""
    override = os.environ.get("TRIOTP_PYTHON")
    if override:
        return override
    for candidate in (shutil.which("python3.13"), "/root/.pyenv/versions/3.13.0/bin/python"):
        if candidate and Path(candidate).exists():
            probe = [candidate, "-c", "import sys; assert sys.version_info >= (3, 13)"]
            if subprocess.run(probe, capture_output=True, check=False).returncode == 0:
                return candidate
    return "python3.13"


RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Runtime"
CHUNKS = 5  # a worker times its calls in this many chunks and reports the median one

# --------------------------------------------------------------------------- workers


def _configure_logs(mode: str, side: str) -> None:
    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the worker)
    if side == "triotp":
        import logbook  # type: ignore[import-not-found]

        if mode == "json":
            logbook.StreamHandler(devnull, level="DEBUG").push_application()
        return
    import logging

    import structlog

    if mode == "json":
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso"),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            logger_factory=structlog.PrintLoggerFactory(devnull),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
            logger_factory=structlog.PrintLoggerFactory(devnull),
            cache_logger_on_first_use=True,
        )


def _restart_gap(side: str, n: int, warmup: int) -> float:
    import trio

    starts: list[float] = []
    total = n + warmup
    clock = time.perf_counter

    async def crash() -> None:
        starts.append(clock())
        if len(starts) >= total:
            await trio.sleep_forever()
        raise RuntimeError("boom")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            if side == "triotp":
                from triotp import supervisor  # type: ignore[import-not-found]

                spec = supervisor.child_spec(
                    id="c", task=crash, args=[], restart=supervisor.restart_strategy.PERMANENT
                )
                opts = supervisor.options(max_restarts=10**9, max_seconds=5)
                await nursery.start(supervisor.start, [spec], opts)
            else:
                import supervise as sv

                sup = sv.Supervisor([sv.child(crash, id="c")], max_restarts=10**9, max_seconds=5)
                await nursery.start(sup.run)
            while len(starts) < total:  # noqa: ASYNC110 (polling keeps both sides' children alike)
                await trio.sleep(0.005)
            nursery.cancel_scope.cancel()

    trio.run(main)
    gaps = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1 :], strict=False)]
    return statistics.median(gaps)


def _calls(side: str, variant: str, n: int, warmup: int) -> float:
    import trio

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            if side == "triotp":
                import types

                from triotp import gen_server, mailbox  # type: ignore[import-not-found]

                module = types.ModuleType("echo_server")

                async def init(_arg: Any) -> int:
                    return 0

                async def handle_call(message: Any, _caller: Any, state: Any) -> Any:
                    return gen_server.Reply(message), state

                module.init = init  # type: ignore[attr-defined]
                module.handle_call = handle_call  # type: ignore[attr-defined]
                mailbox._init()
                nursery.start_soon(gen_server.start, module, None, "echo")
                await trio.sleep(0.01)
                timeout = 5.0 if variant == "timeout" else None

                async def call(i: int) -> Any:
                    return await gen_server.call("echo", i, timeout=timeout)
            else:
                import supervise as sv

                class AsyncEcho(sv.Server):
                    async def handle_call(self, request: Any) -> Any:
                        return request

                class SyncEcho(sv.Server):
                    def handle_call(self, request: Any) -> Any:
                        return request

                server = SyncEcho if variant == "sync" else AsyncEcho
                ref = await nursery.start(server.serve)
                call = ref.call
            for i in range(warmup):
                assert await call(i) == i
            rates = []
            chunk = max(1, n // CHUNKS)
            for _ in range(CHUNKS):  # the median chunk shrugs off bursts of outside load
                t0 = time.perf_counter()
                for i in range(chunk):
                    await call(i)
                rates.append(chunk / (time.perf_counter() - t0))
            nursery.cancel_scope.cancel()
        return statistics.median(rates)

    return trio.run(main)


def worker(args: argparse.Namespace) -> None:
    _configure_logs(args.logs_mode, args.side)
    if args.metric == "restart":
        value = _restart_gap(args.side, args.n, warmup=200)
    else:
        value = _calls(args.side, args.variant, args.n, warmup=500)
    print(json.dumps({"value": value}))


# --------------------------------------------------------------------------- driver


def ensure_triotp_venv() -> Path:
    """Create .venv-triotp (Python 3.13) with triotp 0.3.1, trio 0.35.0 and supervise."""
    python = TRIOTP_VENV / "bin" / "python"
    stamp = TRIOTP_VENV / ".installed"
    wanted = (ROOT / "pyproject.toml").read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    py313 = _python313()
    if not Path(py313).exists():
        sys.exit(f"triotp needs Python >= 3.13: {py313} not found (set TRIOTP_PYTHON)")
    print(f"building {TRIOTP_VENV.name} with {py313} ...", flush=True)
    subprocess.run([py313, "-m", "venv", str(TRIOTP_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for extra in (
        ["triotp==0.3.1", "trio==0.35.0"],
        ["-c", str(ROOT / "constraints.txt"), "-e", str(ROOT)],
    ):
        done = subprocess.run([*pip, *extra], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"pip install {' '.join(extra)} failed:\n{done.stdout}{done.stderr}")
    stamp.write_text(wanted)
    return python


def measure(python: Path, side: str, metric: str, variant: str, logs: str, n: int) -> float:
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "--worker",
        "--side",
        side,
        "--metric",
        metric,
        "--variant",
        variant,
        "--logs-mode",
        logs,
        "--n",
        str(n),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"worker failed: {' '.join(cmd)}\n{out.stderr}")
    value: float = json.loads(out.stdout.strip().splitlines()[-1])["value"]
    return value


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="fresh-process repetitions per figure")
    parser.add_argument("--restarts", type=int, default=3000, help="restarts measured per run")
    parser.add_argument("--calls", type=int, default=20000, help="calls measured per run")
    parser.add_argument("--logs", action="store_true", help="also measure with logs written")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", default="supervise", help=argparse.SUPPRESS)
    parser.add_argument("--metric", default="restart", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--logs-mode", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    py313 = ensure_triotp_venv()
    py_ours = Path(sys.executable)
    v313 = subprocess.run(
        [str(py313), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    v_ours = platform.python_version()

    # (label, metric, variant, logs, unit, lower_is_better)
    rows = [
        ("restart gap (us)", "restart", "default", "off", 1e6, True),
        ("calls/s, sequential", "call", "default", "off", 1.0, False),
        ("calls/s, triotp timeout=5 / ours plain-def handler", "call", "alt", "off", 1.0, False),
    ]
    if args.logs:
        rows.append(
            ("restart gap (us), logs to /dev/null", "restart", "default", "json", 1e6, True)
        )

    table: list[dict[str, Any]] = []
    for label, metric, variant, logs, scale, lower in rows:
        n = args.restarts if metric == "restart" else args.calls
        samples: dict[str, list[float]] = {"triotp": [], "ours313": [], "ours": []}
        for _ in range(args.reps):  # interleaved so that machine noise hits all sides alike
            t_variant = "timeout" if variant == "alt" else "default"
            o_variant = "sync" if variant == "alt" else "default"
            samples["triotp"].append(measure(py313, "triotp", metric, t_variant, logs, n) * scale)
            samples["ours313"].append(
                measure(py313, "supervise", metric, o_variant, logs, n) * scale
            )
            samples["ours"].append(
                measure(py_ours, "supervise", metric, o_variant, logs, n) * scale
            )
        med = {k: statistics.median(v) for k, v in samples.items()}
        # each repetition pairs the two sides a moment apart: their ratio sees the same load
        paired = [o / t for o, t in zip(samples["ours313"], samples["triotp"], strict=True)]
        table.append(
            {
                "label": label,
                "lower": lower,
                "ratio": statistics.median(paired),
                "range": (min(paired), max(paired)),
                **med,
            }
        )
        print(
            f"{label:<52} triotp {med['triotp']:10.1f}  supervise(3.13) {med['ours313']:10.1f}"
            f"  ratio {statistics.median(paired):5.2f}x ({min(paired):.2f}-{max(paired):.2f})"
            f"  supervise({v_ours}) {med['ours']:10.1f}",
            flush=True,
        )

    report = render(table, args, v313, v_ours)
    print()
    print(report)
    if not args.no_write:
        write_results(report)
        print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


def render(table: list[dict[str, Any]], args: argparse.Namespace, v313: str, v_ours: str) -> str:
    lines = [
        SECTION,
        "",
        "supervise's runtime vs [triotp](https://pypi.org/project/triotp/) 0.3.1, measured side by",
        "side in one run (`benchmarks/runtime.py`). Each figure is the median over "
        f"{args.reps} fresh processes per side, sides interleaved. The ratio compares both under "
        f"Python {v313} (triotp needs >= 3.13): the median, and the range, of the {args.reps} "
        "per-repetition ratios (each pairs measurements taken a moment apart).",
        "",
        f"| what | triotp 0.3.1 (py{v313}) | supervise (py{v313}) | ratio | ratio range "
        f"| supervise (py{v_ours}) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in table:
        fmt = "{:,.1f}" if row["lower"] else "{:,.0f}"
        lines.append(
            f"| {row['label']} | {fmt.format(row['triotp'])} | {fmt.format(row['ours313'])} | "
            f"{row['ratio']:.2f}x | {row['range'][0]:.2f}-{row['range'][1]:.2f}x "
            f"| {fmt.format(row['ours'])} |"
        )
    lines += [
        "",
        "- restart gap: median time between successive starts of a permanent child that raises",
        f"  at once ({args.restarts} restarts per run after 200 warm-up ones; lower is better;",
        "  target <= 0.33x triotp).",
        "- calls/s: sequential round trips from one task to an echo server whose handle_call is",
        f"  `async def` on both sides ({args.calls} calls per run after 500 warm-up ones, timed in",
        f"  {CHUNKS} chunks, the median chunk counts; higher is better; target >= 3x triotp).",
        "  triotp calls without a timeout (its default); supervise",
        "  with its default 5 s timeout armed. The third row: triotp with `timeout=5.0`, supervise",
        "  with a plain-def handle_call.",
        "- logs: both sides drop their log records before output (triotp's default: logbook with",
        "  no handler; supervise: structlog filtering below CRITICAL). With `--logs`, an extra row",
        "  writes every record of both, tracebacks included, to /dev/null. That row measures the",
        "  logging pipelines more than the runtimes: per restart supervise writes two records",
        "  (`child_exited` with its traceback, `child_restarted`), triotp one (with its",
        "  traceback), and Python 3.13's `traceback.format_exception` alone takes ~250 us here",
        "  (~55 us on 3.11). The targets apply to the first two rows.",
        f"- machine: {machine()};",
        "  shared with other jobs, so absolute figures are noisy, the ratios less so.",
        "  trio 0.35.0 on both sides.",
        "",
        f"Measured {time.strftime('%Y-%m-%d')}. Reproduce: `.venv/bin/python benchmarks/runtime.py"
        + (f" --reps {args.reps}" if args.reps != 5 else "")
        + (" --logs" if args.logs else "")
        + "` (the first run builds `.venv-triotp`).",
        "",
    ]
    return "\n".join(lines)


def write_results(section: str) -> None:
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else (
            "# Benchmark results\n\nFigures written by the scripts in `benchmarks/`; "
            "each section says "
            "what was measured, how, on which machine, and the command that reproduces it.\n\n"
        )
    )
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end < 0 else text[end + 1 :])
    RESULTS.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
