"""The demo from start to end: prepare, run the supervised training with its faults, collect
the recovery traces, run the failure-free reference, compare, and check for leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import attrs
import trio

from supervise._demo.checks import checks
from supervise._demo.cluster import ClusterSpec, DemoCluster, DemoFailure
from supervise._demo.compare import compare_parameters
from supervise._demo.config import DemoConfig
from supervise._demo.otel import agent_env
from supervise._demo.reference import run_reference
from supervise._demo.result import DemoResult, Narrator, match
from supervise._demo.supervised import run_supervised
from supervise._demo.timeline import RecoveryView, recoveries
from supervise._testing.poll import WaitTimeout, wait_until_async
from supervise._testing.procs import PidBook, SeenProcess, send_signal
from supervise.agents.workers import free_port
from supervise.policy import Policy
from supervise.telemetry.config import TelemetryConfig
from supervise.telemetry.forward import OtlpForwarder, forward_targets
from supervise.telemetry.receiver import OtlpSink, ReceivedSpan

MARKER = ".supervise-demo"  # a directory with this file is the demo's to clear


def packaged_policy() -> Path:
    """The demo's policy file as shipped in the package (the same as policies/demo.toml)."""
    return Path(__file__).with_name("policy.toml")


def prepare_run_dir(path: Path) -> Path:
    """An empty directory for this run's files; a previous demo's directory is cleared, any
    other non-empty directory is refused (DemoFailure) rather than touched."""
    path = path.resolve()
    if path.exists():
        if not path.is_dir():
            raise DemoFailure(f"--out {path}: exists and is not a directory")
        if any(path.iterdir()):
            if not (path / MARKER).exists():
                raise DemoFailure(
                    f"--out {path}: not empty and not a previous demo's directory;"
                    " choose another --out"
                )
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("files of one `supervise demo` run; the next run replaces them\n")
    return path


def _shm_root() -> Path:
    """Where the agents' arenas go: RAM-backed /dev/shm when there is one."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="supervise-demo-", dir=base))


def _endpoints(n: int) -> tuple[str, ...]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port("127.0.0.1")
        if port not in ports:
            ports.append(port)
    return tuple(f"127.0.0.1:{p}" for p in ports)


def train_command(
    config: DemoConfig, out: Path, *, step_delay: float, log_every: int
) -> tuple[str, ...]:
    """The training script both runs execute (only pacing and progress output differ)."""
    return (
        sys.executable,
        "-m",
        "supervise._demo.train",
        "--steps",
        str(config.steps),
        "--seed",
        str(config.seed),
        "--out",
        str(out),
        "--step-delay",
        str(step_delay),
        "--log-every",
        str(log_every),
    )


async def run_demo(
    config: DemoConfig, out: TextIO, *, run_dir: Path, user_telemetry: TelemetryConfig
) -> DemoResult:
    """Run the whole demo in ``run_dir`` (from `prepare_run_dir`), telling ``out`` as it
    goes; the result says what held (``result.ok``)."""
    policy_path = (config.policy or packaged_policy()).resolve()
    policy = Policy.from_toml(policy_path)
    result = DemoResult(config, policy, policy_path, run_dir, time.time())
    say = Narrator(out, result.started_at)
    shutil.copyfile(policy_path, run_dir / "policy.toml")
    faults_dir = run_dir / "faults"
    faults_dir.mkdir()
    targets = forward_targets(user_telemetry)
    forwarder = OtlpForwarder(targets)
    result.forwarded_to = tuple(t.url for t in targets.values())
    sink = OtlpSink(forward=forwarder).start()
    shm_root = _shm_root()
    book = PidBook()
    try:
        spec = ClusterSpec(
            endpoints=_endpoints(config.nodes),
            policy=run_dir / "policy.toml",
            command=train_command(
                config,
                run_dir / "supervised" / "final.pt",
                step_delay=config.step_delay,
                log_every=config.log_every,
            ),
            env=agent_env(
                os.environ, receiver=sink.endpoint, faults_dir=faults_dir, user=user_telemetry
            ),
            run_dir=run_dir,
            shm_root=shm_root,
        )
        _introduce(say, result, sink.endpoint)
        with trio.CancelScope() as interruptible:
            async with trio.open_nursery() as watch:
                watch.start_soon(_interrupt_on_signal, interruptible, result, say)
                await _run_both(
                    config=config,
                    spec=spec,
                    book=book,
                    sink=sink,
                    policy=policy,
                    faults_dir=faults_dir,
                    result=result,
                    say=say,
                )
                watch.cancel_scope.cancel()
        if interruptible.cancelled_caught:  # what arrived so far, without waiting for more
            result.recoveries = recoveries(sink.spans())
            result.entries = match(result.injections, result.recoveries)
    finally:
        sink.stop()  # forwards what is queued first
        result.forward_errors = tuple(forwarder.errors)
        if not config.keep_shm:
            shutil.rmtree(shm_root, ignore_errors=True)
    result.survivors = await _survivors(book)
    result.processes_seen = len(book)
    if result.survivors:
        _kill(result.survivors)
    result.checks = checks(result)
    return result


async def _interrupt_on_signal(scope: trio.CancelScope, result: DemoResult, say: Narrator) -> None:
    """SIGINT or SIGTERM: stop the agents and the reference in order (SIGTERM, then SIGKILL
    after their grace), then check for leftovers and report what happened so far."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            result.interrupted = name
            result.failure = f"interrupted by {name}"
            say(f"{name}: stopping every agent and worker, then checking that none is left")
            scope.cancel()
            return


async def _run_both(
    *,
    config: DemoConfig,
    spec: ClusterSpec,
    book: PidBook,
    sink: OtlpSink,
    policy: Policy,
    faults_dir: Path,
    result: DemoResult,
    say: Narrator,
) -> None:
    """The supervised run with its faults, its spans, and the reference (after it, or
    alongside it), then the comparison."""
    run_dir = result.run_dir
    async with trio.open_nursery() as outer:
        reference = _Reference(config, run_dir, book, say)
        if config.reference_alongside:
            outer.start_soon(reference.run)
        async with trio.open_nursery() as nursery:
            cluster = await nursery.start(DemoCluster(spec, book).run)
            result.cluster = cluster
            try:
                await run_supervised(
                    cluster,
                    config=config,
                    policy=policy,
                    faults_dir=faults_dir,
                    result=result,
                    say=say,
                )
            except DemoFailure as exc:
                result.failure = str(exc)
                say(f"FAILED: {exc}")
                say("stopping every agent (SIGTERM, then SIGKILL after the grace)")
            nursery.cancel_scope.cancel()
        result.recoveries = await _collect_spans(sink, len(result.injections), run_dir)
        result.entries = match(result.injections, result.recoveries)
        if result.failure is not None:
            outer.cancel_scope.cancel()  # no comparison without a finished supervised run
        elif not config.reference_alongside:
            await reference.run()
    if result.failure is None:
        await _compare(run_dir, reference, result)


def _introduce(say: Narrator, result: DemoResult, receiver: str) -> None:
    config, policy = result.config, result.policy
    r, c = policy.recovery, policy.cluster
    say(
        f"supervise demo: {config.nodes} node agents on 127.0.0.1 train an MLP for {config.steps}"
        f" steps (torch.distributed gloo, CPU) through Snapshotter"
    )
    say(f"  files: {result.run_dir}")
    snapshots = (
        f"snapshot every {policy.snapshot.every_steps} steps, keep {policy.retention.keep_last},"
        f" replicas {policy.replication.replicas} ({policy.replication.placement})"
    )
    timeouts = (
        f"heartbeat_timeout {r.heartbeat_timeout:g} s, peer_timeout {c.peer_timeout:g} s,"
        f" startup_timeout {r.startup_timeout:g} s"
    )
    say(f"  policy {_policy_name(result.policy_path)}: {snapshots}; {timeouts}")
    forwarded = result.forwarded_to
    also = f"; also forwarded to {', '.join(forwarded)} (from OTEL_*)" if forwarded else ""
    say(f"  traces: the agents export OTLP to the demo's receiver {receiver}{also}")
    say(f"  faults, in order: {', '.join(f.label for f in config.faults) or 'none'}")


def _policy_name(path: Path) -> str:
    return "policies/demo.toml (built in)" if path == packaged_policy().resolve() else str(path)


# -- after the run -------------------------------------------------------------------------------


def write_spans(spans: list[ReceivedSpan], path: Path) -> None:
    """Every span the agents exported, one JSON object a line (the timeline's raw data)."""
    with open(path, "w", encoding="utf-8") as f:
        for span in sorted(spans, key=lambda s: s.start_unix_nano):
            f.write(json.dumps(attrs.asdict(span), default=_jsonable, sort_keys=True) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


async def _collect_spans(sink: OtlpSink, expected: int, run_dir: Path) -> list[RecoveryView]:
    """The recoveries the agents traced (they flush at exit: a short wait covers the rest)."""

    def complete(s: OtlpSink) -> bool:
        return sum(1 for v in recoveries(s.spans()) if v.outcome != "unfinished") >= expected

    with contextlib.suppress(TimeoutError):
        await trio.to_thread.run_sync(sink.wait_for, complete, 10.0)
    spans = sink.spans()
    write_spans(spans, run_dir / "spans.jsonl")
    return recoveries(spans)


class _Reference:
    """The failure-free reference run (see `supervise._demo.reference`): after the supervised
    run, or alongside it (``--quick``: shorter, its load shows in the recovery times)."""

    def __init__(self, config: DemoConfig, run_dir: Path, book: PidBook, say: Narrator) -> None:
        self.config = config
        self.dir = run_dir / "reference"
        self.book = book
        self.say = say
        self.seconds: float | None = None
        self.failure: str | None = None

    async def run(self) -> None:
        config, when = self.config, "alongside" if self.config.reference_alongside else "now"
        self.say(
            f"reference ({when}): the same script, {config.nodes} workers launched plainly with"
            " torchrun's environment (no agents, no faults)"
        )
        command = train_command(config, self.dir / "final.pt", step_delay=0.0, log_every=0)
        try:
            self.seconds = await run_reference(
                command, world=config.nodes, run_dir=self.dir, book=self.book, limit_s=600.0
            )
        except DemoFailure as exc:
            self.failure = str(exc)
            self.say(f"FAILED: {exc}")
            return
        self.say(f"  reference finished in {self.seconds:.1f} s")


async def _compare(run_dir: Path, reference: _Reference, result: DemoResult) -> None:
    result.reference_seconds = reference.seconds
    if reference.failure is not None:
        result.failure = reference.failure
        return
    supervised = run_dir / "supervised" / "final.pt"
    if not supervised.exists():
        result.failure = f"the supervised run wrote no final parameters ({supervised})"
        return
    result.comparison = await trio.to_thread.run_sync(
        compare_parameters, supervised, reference.dir / "final.pt"
    )


async def _survivors(book: PidBook) -> list[SeenProcess]:
    """Processes seen that still run, after a short grace (5 s) for exits already under way."""
    with contextlib.suppress(WaitTimeout):
        await wait_until_async(
            lambda: not book.survivors(),
            what="every process seen to exit",
            timeout_s=5.0,
            interval_s=0.1,
        )
    return book.survivors()


def _kill(survivors: list[SeenProcess]) -> None:
    """Leave the machine clean even when the check failed (by PID, as seen)."""
    for seen in survivors:
        send_signal(seen.pid, signal.SIGKILL)
