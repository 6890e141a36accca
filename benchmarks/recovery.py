"""Recovery benchmark: time from a failure to the next completed training step, per failure
kind, and goodput under a failure every N seconds, for supervise and for the status quo.

Both sides train the same model (``supervise._demo.train``: an MLP, AdamW, gloo
all-reduce, deterministic) on the same machine in the same run, one worker per node:

- supervise: one ``supervise node`` agent per node on loopback; snapshots in RAM every K
  steps, replicated to the peer; recovery phases read from its OpenTelemetry spans (an
  in-process OTLP receiver) and from the workers' progress events;
- the status quo: a torchrun-style launcher (``_recovery_harness.TorchrunLike``) that
  restarts every worker on any failure; the script (``_torchsave_train.py``) saves a
  ``torch.save`` checkpoint to local disk every K steps and ``torch.load``s it at start.

Failures: worker crash (``kill -9`` of a worker), hang (``SIGSTOP`` of a worker), node loss
(``kill -9`` of an agent and its worker, a replacement agent with an empty snapshot directory
started at once; status quo: ``kill -9`` of the worker, its checkpoint read back cold from
disk), node loss with a standby (the same kill, no replacement started: a hot standby agent,
``supervise node --standby``, waiting with a warm spare takes the rank over; status quo: as
node loss), NaN (the demo's fault injection makes one rank's loss NaN).

    python benchmarks/recovery.py            # the full run (~40 min on 2 shared cores)
    python benchmarks/recovery.py --quick    # one trial per kind, short goodput windows

Writes the "## Recovery" section of benchmarks/RESULTS.md (``--no-write`` to skip) and every
measurement as JSON (``--json FILE``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import mmap
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from supervise._testing import LocalCluster, WaitTimeout, send_signal, sweep, wait_until

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _recovery_harness import Event, ProgressLog, TorchrunLike  # noqa: E402

RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- recovery:begin -->", "<!-- recovery:end -->"
KINDS = ("crash", "hang", "node_loss", "node_loss_standby", "nan")
NODE_LOSSES = ("node_loss", "node_loss_standby")
SUPERVISE, BASELINE = "supervise", "torchrun + torch.save"
ROOT_SPAN = "supervise.recovery"
#: The failure trials' span batching delay (ms): each trial's spans are read while the run
#: goes on. Every other run exports on the SDK's default schedule (5 s), as users' agents do:
#: a capture span every few steps exported at once costs the agents ~1 ms of CPU per step.
TRIAL_SPAN_DELAY_MS = 200


@dataclass
class Config:
    hidden: int = 2048
    width: int = 64
    batch: int = 64
    nodes: int = 2
    sv_every: int = 5
    sv_preload: tuple[str, ...] | None = None  # None: the policy's default
    sv_replicate_every: float = 0.0  # supervise's replication.every_seconds (0: every one)
    bl_every: int = 0  # 0: Young's interval from the measured save time, for N = 60 s
    hang_timeout: float = 10.0
    hang_detection: str = "adaptive"  # supervise's recovery.hang_detection ("timeout": before)
    peer_timeout: float = 2.0
    heartbeat_interval: float = 0.5
    worker_shutdown: float = 5.0
    reps: int = 3
    kinds: tuple[str, ...] = KINDS
    settle_steps: int = 40
    intervals: tuple[float, ...] = (20.0, 60.0)
    failures: int = 4
    ff_window: float = 20.0
    ref_rounds: int = 2
    seed: int = 7
    step_delay: float = 0.0  # sleep per step in both training scripts (the smoke test paces)
    spares_wait: float = 60.0  # how long a trial waits for warm spares before it injects anyway
    workdir: Path = Path()


# -- measurements --------------------------------------------------------------------------


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


class Floors:
    """Plain single-threaded copies of the state's size (the restore copies with one thread,
    as the demo sets), sampled throughout the run: between runs ("idle": only other people's
    load) and right after each trial's recovery ("loaded": our training running too)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.src = np.ones(nbytes, dtype=np.uint8)
        self.dst = np.empty(nbytes, dtype=np.uint8)
        self.dst.fill(0)
        self.prealloc: dict[str, list[float]] = {"idle": [], "loaded": []}
        self.fresh: dict[str, list[float]] = {"idle": [], "loaded": []}

    def sample(self, *, idle: bool, reps: int = 5) -> None:
        tag = "idle" if idle else "loaded"
        for _ in range(reps):
            t0 = time.perf_counter()
            np.copyto(self.dst, self.src)
            self.prealloc[tag].append(time.perf_counter() - t0)
            with mmap.mmap(-1, self.nbytes) as m:  # fresh pages, as a new process's tensors
                dst = np.frombuffer(m, dtype=np.uint8)
                t0 = time.perf_counter()
                np.copyto(dst, self.src)
                self.fresh[tag].append(time.perf_counter() - t0)
                del dst


def state_bytes(cfg: Config) -> int:
    """Bytes of one rank's training state (parameters, buffers, AdamW state)."""
    import torch

    from supervise._demo.train import build_model

    model = build_model(cfg.width, cfg.hidden, 16, 1234)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, cfg.width)).sum().backward()
    opt.step()
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return int(n)


def same_params(a: Path, b: Path) -> bool:
    import torch

    x, y = torch.load(a), torch.load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- the two systems -----------------------------------------------------------------------


def train_args(cfg: Config, steps: int, progress: Path, out: Path | None) -> list[str]:
    args = [
        "--steps", str(steps), "--hidden", str(cfg.hidden), "--width", str(cfg.width),
        "--batch", str(cfg.batch), "--progress", str(progress),
    ]  # fmt: skip
    if out is not None:
        args += ["--out", str(out)]
    if cfg.step_delay:
        args += ["--step-delay", str(cfg.step_delay)]
    return args


def preload_line(cfg: Config) -> str:
    if cfg.sv_preload is None:
        return ""
    return "preload = [" + ", ".join(json.dumps(m) for m in cfg.sv_preload) + "]\n"


def _replicated(cfg: Config) -> str:
    """How often the supervise policy replicates, in words."""
    every = cfg.sv_replicate_every
    return f"at most every {every:g} s (`replication.every_seconds`)" if every else "every one"


def policy_text(cfg: Config) -> str:
    return f"""\
[snapshot]
every_steps = {cfg.sv_every}
[retention]
keep_last = 2
[replication]
replicas = 2
every_seconds = {cfg.sv_replicate_every}
[recovery]
{preload_line(cfg)}max_attempts = 10
heartbeat_timeout = {cfg.hang_timeout}
hang_detection = "{cfg.hang_detection}"
startup_timeout = 120.0
on_nan = "rollback"
[recovery.backoff]
initial = 0.0
max = 5.0
reset_after = 5.0
[cluster]
heartbeat_interval = {cfg.heartbeat_interval}
peer_timeout = {cfg.peer_timeout}
"""


class Run:
    """One training run of one system: start, progress, failure injection, stop."""

    system: str
    progress: ProgressLog
    ranks: list[int]

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg = cfg
        self.dir = cfg.workdir / name
        self.dir.mkdir(parents=True)
        self.faults = self.dir / "faults"
        self.faults.mkdir()
        self.progress = ProgressLog(self.dir / "progress.jsonl")
        self.ranks = list(range(cfg.nodes))
        self.out = self.dir / "final.pt"
        self.ended: dict[str, Any] = {}

    # subclass API
    def start(self, steps: int, *, out: bool) -> None:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        raise NotImplementedError

    def wait_finished(self, timeout: float) -> bool:
        raise NotImplementedError

    def node_loss(self, rank: int, pid: int, *, standby: bool = False) -> None:
        raise NotImplementedError

    def pids(self) -> set[int]:
        raise NotImplementedError

    def live_worker_pid(self, rank: int) -> int:
        """The PID of rank's newest worker process, whether it trains yet or not."""
        raise NotImplementedError

    def spares_ready(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until a restart would find its processes warm; False if
        they were not by then. The status quo keeps nothing warm: always True."""
        return True

    def prepare(self, kind: str) -> None:
        """Set up what a trial of ``kind`` needs before its failure (nothing by default)."""

    # common
    def current_pid(self, rank: int) -> int:
        gen = max(e.gen for e in self.progress.of("step"))
        pids = self.progress.worker_pids(gen)
        return pids[rank]

    def inject(self, kind: str, rank: int) -> float:
        """Inject one failure; returns its wall time."""
        self.progress.poll()
        if kind == "nan":
            t = time.time()
            (self.faults / f"nan-rank{rank}").touch()
            return t
        pid = self.current_pid(rank)
        t = time.time()
        if kind == "crash":
            send_signal(pid, signal.SIGKILL)
        elif kind == "hang":
            send_signal(pid, signal.SIGSTOP)
        elif kind in NODE_LOSSES:
            self.node_loss(rank, pid, standby=kind == "node_loss_standby")
        else:
            raise ValueError(kind)
        return t

    def wait_step(self, step: int, timeout: float) -> None:
        self.progress.wait(
            lambda: (self.progress.current_step(self.ranks) or -1) >= step,
            timeout,
            f"{self.system}: step {step}",
        )


class SuperviseRun(Run):
    system = SUPERVISE

    def __init__(
        self, cfg: Config, name: str, sink: Any, *, span_delay_ms: int | None = None
    ) -> None:
        super().__init__(cfg, name)
        self.sink = sink
        # None: the OpenTelemetry SDK's batching (a span export every 5 s), what users run;
        # the trials read each recovery's spans while the run goes on and want them sooner
        self.span_delay_ms = span_delay_ms
        self.policy = self.dir / "policy.toml"
        self.policy.write_text(policy_text(cfg))
        self.shm = Path(tempfile.mkdtemp(prefix="recbench-", dir="/dev/shm"))
        self.cluster: LocalCluster | None = None

    def start(self, steps: int, *, out: bool) -> None:
        cmd = [
            sys.executable, "-m", "supervise._demo.train",
            *train_args(self.cfg, steps, self.progress.path, self.out if out else None),
        ]  # fmt: skip
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.sink.endpoint,
            "OTEL_METRICS_EXPORTER": "none",
            "SUPERVISE_DEMO_FAULTS": str(self.faults),
        }
        if self.span_delay_ms is not None:
            env["OTEL_BSP_SCHEDULE_DELAY"] = str(self.span_delay_ms)
        self.cluster = LocalCluster(
            self.dir,
            self.cfg.nodes,
            command=cmd,
            policy=self.policy,
            env=env,
            worker_shutdown=self.cfg.worker_shutdown,
            shm_root=self.shm,
        )
        self.cluster.start_all()

    def prepare(self, kind: str) -> None:
        """A standby only for the trial that measures one (started before it, warm by
        `spares_ready`): one waiting during a plain node loss would take that rank over."""
        assert self.cluster is not None
        self.adopt_standbys()
        if kind == "node_loss_standby" and not self.cluster.standbys:
            self.cluster.start_standby()

    def adopt_standbys(self) -> None:
        """A standby that took a rank over is that rank's agent from then on."""
        assert self.cluster is not None
        for standby in list(self.cluster.standbys):
            self.cluster.took_over(standby)

    def node_loss(self, rank: int, pid: int, *, standby: bool = False) -> None:
        assert self.cluster is not None
        self.adopt_standbys()
        self.cluster.kill_agent(rank)
        send_signal(pid, signal.SIGKILL)
        if not standby:
            self.cluster.start(rank)  # else: the standby takes the rank over

    def wait_finished(self, timeout: float) -> bool:
        assert self.cluster is not None
        self.adopt_standbys()
        codes = self.cluster.wait_all_exit(timeout)
        return all(c == 0 for c in codes.values())

    def stop(self) -> dict[str, Any]:
        codes: dict[int, int] = {}
        orphans: list[int] = []
        if self.cluster is not None:
            codes = self.cluster.stop()
            orphans = self.cluster.sweep(self.progress.all_pids())
        else:
            orphans = sweep(self.progress.all_pids())
        shutil.rmtree(self.shm, ignore_errors=True)
        return {"exit_codes": codes, "orphans": orphans}

    def pids(self) -> set[int]:
        agents = self.cluster.pids() if self.cluster is not None else set()
        return agents | self.progress.all_pids()

    def live_worker_pid(self, rank: int) -> int:
        assert self.cluster is not None
        pid = None
        for _, line in self.cluster.all_events("workers started"):
            if str(rank) in line.get("pids", {}):
                pid = int(line["pids"][str(rank)])
        if pid is None:
            raise LookupError(f"no worker of rank {rank} started yet")
        return pid

    def spares_ready(self, timeout: float) -> bool:
        """Every live agent's newest spare worker has its imports done (`spare worker ready`):
        a trial measures a restart with warm spares, as a failure long after the last one
        finds them (a failure seconds after a restart meets a spare still importing)."""
        cluster = self.cluster
        assert cluster is not None

        def ready() -> bool:
            newest: dict[int, int] = {}  # agent pid -> its newest spare's pid
            done: set[int] = set()
            for agent, line in cluster.all_events():
                if line.get("event") == "process_started" and line.get("child") == "spare worker":
                    newest[agent.pid] = int(line["pid"])
                elif line.get("event") == "spare worker ready":
                    done.add(int(line["pid"]))
            self.adopt_standbys()
            live = {a.pid for a in [*cluster.agents.values(), *cluster.standbys]}
            return live <= newest.keys() and all(newest[a] in done for a in live)

        try:
            wait_until(ready, what="warm spares on every node", timeout_s=timeout, interval_s=0.2)
        except WaitTimeout:
            return False
        return True


class BaselineRun(Run):
    system = BASELINE

    def __init__(self, cfg: Config, name: str, every: int) -> None:
        super().__init__(cfg, name)
        self.every = every
        self.ckpt = self.dir / "ckpt"
        self.launcher: TorchrunLike | None = None
        self._cold_next = False
        self.evictions: list[tuple[float, float]] = []

    def start(self, steps: int, *, out: bool) -> None:
        cmd = [
            sys.executable, str(HERE / "_torchsave_train.py"),
            *train_args(self.cfg, steps, self.progress.path, self.out if out else None),
            "--ckpt-dir", str(self.ckpt), "--every", str(self.every),
            "--pg-timeout", str(self.cfg.hang_timeout),
        ]  # fmt: skip
        self.launcher = TorchrunLike(
            cmd,
            nproc=self.cfg.nodes,
            workdir=self.dir,
            env={"SUPERVISE_DEMO_FAULTS": str(self.faults)},
            grace=self.cfg.worker_shutdown,
            before_restart=self._before_restart,
        )
        self.launcher.start()

    def _before_restart(self) -> None:
        if not self._cold_next:
            return
        self._cold_next = False
        t0 = time.time()
        for p in self.ckpt.glob("*.pt"):
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        self.evictions.append((t0, time.time()))

    def node_loss(self, rank: int, pid: int, *, standby: bool = False) -> None:
        # No standby here (torchrun has none): as a node loss.
        # The replacement node reads the checkpoint from (shared) storage, not its page cache.
        self._cold_next = True
        send_signal(pid, signal.SIGKILL)

    def wait_finished(self, timeout: float) -> bool:
        assert self.launcher is not None
        return self.launcher.wait(timeout) == 0

    def stop(self) -> dict[str, Any]:
        if self.launcher is not None:
            self.launcher.stop()
        orphans = sweep(self.pids())
        return {"exit_codes": {}, "orphans": orphans}

    def pids(self) -> set[int]:
        return (self.launcher.all_pids if self.launcher else set()) | self.progress.all_pids()

    def live_worker_pid(self, rank: int) -> int:
        assert self.launcher is not None
        return self.launcher.worker_pid(rank)


@contextlib.contextmanager
def running(run: Run, steps: int, *, out: bool) -> Iterator[Run]:
    """Start ``run`` and always stop it (by PID), recording how it ended."""
    try:
        run.start(steps, out=out)
        yield run
    finally:
        run.ended = run.stop()


# -- per-failure-kind trials ---------------------------------------------------------------


@dataclass
class Trial:
    system: str
    kind: str
    rep: int
    rank: int
    t_fail: float
    gen_before: int
    t_resumed: float = math.nan
    gen_after: int = 0
    step_at_failure: int = -1
    restored_step: int | None = None
    phases: dict[str, float] = field(default_factory=dict)
    process: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.t_resumed - self.t_fail


def worker_split(progress: ProgressLog, gen: int, rank: int, boundary: float) -> dict[str, float]:
    """Where a restarted worker's start went, from its own events: spawn latency (from
    ``boundary``, when the system decided to spawn), interpreter + imports, rendezvous,
    building the model (+ Snapshotter / checkpoint lookup). A spare worker, spawned before
    the failure, counts only the imports it still had to do after ``boundary``."""
    ev = {e.ev: e for e in progress.events if e.gen == gen and e.rank == rank}
    out: dict[str, float] = {}
    main, rdv, ready = ev.get("main"), ev.get("rendezvous"), ev.get("ready")
    if main is None or rdv is None or ready is None:
        return out
    started = main.fields.get("started")
    if isinstance(started, (int, float)):
        out["spawn"] = max(0.0, started - boundary)
        out["imports"] = main.t - max(started, boundary)
    else:
        out["spawn+imports"] = main.t - boundary
    out["rendezvous"] = rdv.t - main.t
    out["build"] = ready.t - rdv.t
    return out


def resumed_of(run: Run, trial: Trial) -> tuple[int, dict[int, Event]]:
    found = run.progress.resumed(trial.gen_before, run.ranks)
    assert found is not None
    return found


def analyse_supervise(run: SuperviseRun, trial: Trial, root: Any) -> None:
    spans = run.sink.spans(trace_id=root.trace_id)
    kids = [s for s in spans if s.parent_span_id == root.span_id]
    # supervise.attempt counts on across recoveries until recovery.backoff.reset_after (the
    # backoff's count): this recovery's attempts are the distinct numbers its phases carry
    numbers = {int(s.attributes.get("supervise.attempt", 1)) for s in kids}
    last = max(numbers, default=1)
    kids = [
        s
        for s in kids
        if int(s.attributes.get("supervise.attempt", 1)) == last
        or s.name == "supervise.recovery.detect"  # once per recovery, in its first attempt
    ]
    trial.detail["attempts"] = max(1, len(numbers))
    trial.detail["trigger"] = root.attributes.get("supervise.trigger")

    def named(phase: str) -> list[Any]:
        return [s for s in kids if s.name == f"supervise.recovery.{phase}"]

    def t(ns: int) -> float:
        return ns / 1e9

    detect, select = named("detect"), named("select_checkpoint")
    if not detect or not select:
        trial.detail["error"] = "spans missing"
        return
    resumes = named("resume")
    # The breakdown follows one node: the one that fetched its shard (node loss), else the
    # one whose first step came last (all nodes resume within one collective of each other).
    fetching = named("fetch")
    if fetching:
        f = max(fetching, key=lambda s: s.end_unix_nano - s.start_unix_nano)
        node = f.attributes.get("supervise.node.rank")
    else:
        last_resume = max(resumes, key=lambda s: s.end_unix_nano) if resumes else None
        node = None if last_resume is None else last_resume.attributes.get("supervise.node.rank")
    mine = [s for s in kids if s.attributes.get("supervise.node.rank") == node]
    resume_end = max((s.end_unix_nano for s in resumes), default=None)
    fetch = [s for s in mine if s.name == "supervise.recovery.fetch"]
    restore = [s for s in mine if s.name == "supervise.recovery.restore"]
    d_end = t(detect[0].end_unix_nano)
    s_end = t(select[0].end_unix_nano)
    trial.phases["detect"] = d_end - trial.t_fail
    trial.detail["detect_span"] = d_end - t(detect[0].start_unix_nano)
    trial.phases["select_checkpoint"] = s_end - t(select[0].start_unix_nano)
    boundary = s_end
    if fetch:
        f = fetch[0]
        trial.phases["fetch"] = t(f.end_unix_nano) - t(f.start_unix_nano)
        trial.detail["fetch_bytes"] = f.attributes.get("supervise.bytes")
        trial.detail["fetch_source"] = f.attributes.get("supervise.snapshot.source")
        boundary = t(f.end_unix_nano)
    if restore and resume_end is not None:
        r = restore[0]
        r0, r1 = t(r.start_unix_nano), t(r.end_unix_nano)
        trial.phases["process_start"] = r0 - boundary
        trial.phases["restore"] = r1 - r0
        trial.phases["resume"] = t(resume_end) - r1
        trial.detail["restore_bytes"] = r.attributes.get("supervise.bytes")
        trial.detail["restore_source"] = r.attributes.get("supervise.snapshot.source")
        trial.detail["critical_node"] = node
        if isinstance(node, int):
            trial.process = worker_split(run.progress, trial.gen_after, node, boundary)
    # every node's restore (the target compares each with a plain copy of its bytes)
    trial.detail["restores"] = {
        str(s.attributes.get("supervise.node.rank")): t(s.end_unix_nano) - t(s.start_unix_nano)
        for s in kids
        if s.name == "supervise.recovery.restore"
    }
    fetches = {
        str(s.attributes.get("supervise.node.rank")): t(s.end_unix_nano) - t(s.start_unix_nano)
        for s in kids
        if s.name == "supervise.recovery.fetch"
    }
    if fetches:
        trial.detail["fetches"] = fetches
    trial.detail["worker_restore"] = {
        str(e.rank): e.fields.get("seconds")
        for e in run.progress.of("restored", gen=trial.gen_after)
    }
    trial.phases["other"] = trial.total - sum(trial.phases.values())


def analyse_baseline(run: BaselineRun, trial: Trial) -> None:
    assert run.launcher is not None
    evs = [e for e in run.launcher.events if e.t >= trial.t_fail]
    failure = next((e for e in evs if e.kind == "failure"), None)
    stopped = next((e for e in evs if e.kind == "stopped"), None)
    spawned = next((e for e in evs if e.kind == "spawned"), None)
    if failure is None or stopped is None or spawned is None:
        trial.detail["error"] = "launcher events missing"
        return
    trial.detail["failed_ranks"] = dict(failure.detail)
    trial.phases["detect"] = failure.t - trial.t_fail
    trial.phases["stop_workers"] = stopped.t - failure.t
    evict = [b - a for a, b in run.evictions if a >= stopped.t and b <= spawned.t]
    if evict:
        trial.detail["evict_s"] = evict[0]  # simulation only: excluded from the total
        trial.t_resumed -= evict[0]
    gen, firsts = resumed_of(run, trial)
    last_rank = max(firsts, key=lambda r: firsts[r].t)
    restored = {e.rank: e for e in run.progress.of("restored", gen=gen)}
    r = restored.get(last_rank)
    seconds = float(r.fields.get("seconds") or 0.0) if r is not None else 0.0
    boundary = stopped.t + trial.detail.get("evict_s", 0.0)  # then it spawns at once
    if r is not None:
        r0 = r.t - seconds
        trial.phases["process_start"] = r0 - boundary
        trial.phases["restore"] = seconds
        trial.phases["resume"] = firsts[last_rank].t - r.t
    trial.detail["restores"] = {
        str(k): float(v.fields.get("seconds") or 0.0) for k, v in restored.items()
    }
    trial.process = worker_split(run.progress, gen, last_rank, boundary)
    trial.phases["other"] = trial.total - sum(trial.phases.values())


def trial_run(
    cfg: Config, run: Run, rep: int, kinds: Sequence[str], floors: Floors, rng: random.Random
) -> list[Trial]:
    """One training run with one failure of each kind, at fixed steps; then it must finish."""
    warmup = warmup_steps(cfg)
    steps = trial_steps(cfg)
    trials: list[Trial] = []
    settled = 0  # the next failure waits for this step: the last recovery's workers have a
    # step history by then (a hang detector judging a fresh worker uses the timeout alone)
    with running(run, steps, out=True):
        for i, kind in enumerate(kinds):
            run.wait_step(max(warmup + i * cfg.settle_steps, settled), timeout=300)
            run.prepare(kind)
            warm = run.spares_ready(cfg.spares_wait)
            step_s = step_time(run.progress, run.ranks)
            time.sleep(rng.uniform(0, step_s))
            rank = (rep + i) % cfg.nodes
            run.progress.poll()  # the wait for spares may have outlasted the rest of the run
            gen0 = run.progress.generation
            step0 = run.progress.current_step(run.ranks) or -1
            if step0 >= steps - 10:  # the previous trial's analysis outlasted the run
                skipped = Trial(run.system, kind, rep, rank, time.time(), gen0)
                skipped.detail["error"] = f"not injected: the run was at step {step0} of {steps}"
                trials.append(skipped)
                print(f"  {run.system:24} {kind:10} skipped: {skipped.detail['error']}")
                continue
            t_fail = run.inject(kind, rank)
            trial = Trial(run.system, kind, rep, rank, t_fail, gen0)
            trial.detail["spares_ready"] = warm
            run.progress.wait(
                functools.partial(_resumed, run, gen0),
                180,
                f"{run.system}: resume after {kind}",
            )
            gen, firsts = resumed_of(run, trial)
            trial.gen_after = gen
            trial.t_resumed = max(e.t for e in firsts.values())
            trial.step_at_failure = max(step0, run.progress.step_at(t_fail, run.ranks))
            if kind == "nan":  # the step that went NaN (the marker is read at the next step)
                bad = [
                    e.step
                    for e in run.progress.events
                    if e.gen == gen0 and e.step is not None and e.t >= t_fail
                    and (e.ev == "nan" or (e.ev == "step" and not _finite(e.fields.get("loss"))))
                ]  # fmt: skip
                if bad:
                    trial.step_at_failure = min(bad)
            restored = [e for e in run.progress.of("restored", gen=gen)]
            steps_back = [e.step for e in restored if e.step is not None]
            trial.restored_step = min(steps_back) if steps_back else None
            if isinstance(run, SuperviseRun):
                root, concurrent = recovery_root(run.sink, trial, cfg.nodes)
                run.progress.poll()
                analyse_supervise(run, trial, root)
                trial.detail["recovery_traces"] = concurrent
            else:
                run.progress.poll()
                analyse_baseline(run, trial)  # type: ignore[arg-type]
            trials.append(trial)
            print(
                f"  {run.system:24} {kind:10} rank {rank}: {trial.total:6.2f} s  "
                + "  ".join(f"{k} {v:.3f}" for k, v in trial.phases.items())
            )
            floors.sample(idle=False)
            settled = (run.progress.current_step(run.ranks) or 0) + cfg.settle_steps // 2
        finished = run.wait_finished(timeout=600)
    run.progress.poll()
    ended = run.ended
    for t in trials:
        t.detail["run_finished"] = finished
        t.detail["orphans"] = ended["orphans"]
    return trials


def recovery_root(sink: Any, trial: Trial, nodes: int) -> tuple[Any, int]:
    """The root span of the recovery that brought ``trial``'s training back, and how many
    recovery traces began between the failure and the resumption (more than one when two
    agents ran recoveries at once). Chosen by when its last node resumed, not by counting:
    a replacement agent can start a trace of its own."""
    lo, hi = int((trial.t_fail - 0.5) * 1e9), int((trial.t_resumed + 0.5) * 1e9)

    def candidates(s: Any) -> list[Any]:
        return [r for r in s.spans(ROOT_SPAN) if lo <= r.start_unix_nano <= hi]

    wait_until(
        lambda: candidates(sink),
        what=f"a {ROOT_SPAN} span of the {trial.kind} trial at the collector",
        timeout_s=30.0,
    )
    # Every node exports its own phases, on its own schedule (a replacement agent's can
    # come last): wait for each node's restore and resume of one of them.
    with contextlib.suppress(WaitTimeout):
        wait_until(
            lambda: any(_phases_arrived(r.trace_id, nodes, sink) for r in candidates(sink)),
            what="every node's restore and resume spans",
            timeout_s=30.0,
        )
    roots = candidates(sink)

    def distance(root: Any) -> float:
        ends = [
            s.end_unix_nano
            for s in sink.spans(trace_id=root.trace_id)
            if s.name == "supervise.recovery.resume"
        ]
        return abs(max(ends) / 1e9 - trial.t_resumed) if ends else math.inf

    return min(roots, key=distance), len(roots)


def _phases_arrived(trace_id: str, nodes: int, sink: Any) -> bool:
    """Whether the collector holds a restore and a resume span of every node in a trace."""
    spans = sink.spans(trace_id=trace_id)
    return all(
        len({s.attributes.get("supervise.node.rank") for s in spans if s.name == name}) >= nodes
        for name in ("supervise.recovery.restore", "supervise.recovery.resume")
    )


def _resumed(run: Run, gen: int) -> bool:
    """Whether every rank completed a step in a generation newer than ``gen``."""
    return run.progress.resumed(gen, run.ranks) is not None


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def warmup_steps(cfg: Config) -> int:
    """Steps before the first failure: both systems hold a checkpoint by then."""
    return max(4 * cfg.sv_every, cfg.bl_every + 5, 20)


def trial_steps(cfg: Config) -> int:
    """Steps of every trial run (and of the failure-free references they are compared to);
    the tail leaves room for trials that waited for supervise's spares to be ready."""
    return warmup_steps(cfg) + len(cfg.kinds) * cfg.settle_steps + 120


def step_time(progress: ProgressLog, ranks: Sequence[int], last: int = 20) -> float:
    """Median time per step of the newest generation over its last ``last`` steps."""
    steps = [e for e in progress.of("step") if e.rank == ranks[0]]
    if len(steps) < 3:
        return 0.1
    gen = steps[-1].gen
    ts = [e.t for e in steps if e.gen == gen][-last:]
    if len(ts) < 3:
        return 0.1
    return statistics.median(b - a for a, b in itertools.pairwise(ts))


# -- failure-free references ---------------------------------------------------------------


@dataclass
class Reference:
    system: str
    steps: int
    step_s: float
    finished: bool
    orphans: list[int]
    save_s: float | None = None
    final: Path | None = None


def reference_run(run: Run, steps: int) -> Reference:
    """A failure-free run to the end: its time per step and its final parameters."""
    with running(run, steps, out=True):
        finished = run.wait_finished(timeout=900)
    run.progress.poll()
    steps_ev = [e for e in run.progress.of("step") if e.rank == 0]
    ts = [e.t for e in steps_ev][10:]  # past the first steps (allocation, first capture)
    step_s = (ts[-1] - ts[0]) / (len(ts) - 1)
    saves = [float(e.fields["seconds"]) for e in run.progress.of("saved")]
    return Reference(
        run.system,
        steps,
        step_s,
        finished,
        run.ended["orphans"],
        save_s=statistics.median(saves) if saves else None,
        final=run.out if run.out.exists() else None,
    )


def young_interval(save_s: float, mtbf_s: float, step_s: float) -> int:
    """Young's optimal checkpoint interval sqrt(2 * C * MTBF), in steps."""
    return max(1, round(math.sqrt(2 * save_s * mtbf_s) / step_s))


# -- goodput -------------------------------------------------------------------------------


@dataclass
class Goodput:
    system: str
    interval: float
    ff_rates: list[float]  # steps/s in the failure-free windows around the intervals
    interval_steps: list[int]  # steps gained in each failure interval
    recoveries: int
    every: int
    settled_rates: list[float]  # steps/s in each interval from SETTLE s after its failure on

    @property
    def useful_steps(self) -> int:
        return sum(self.interval_steps)

    @property
    def window(self) -> float:
        return self.interval * len(self.interval_steps)

    @property
    def expected_steps(self) -> list[float]:
        """Steps each failure interval would have gained without its failure: the interval
        times the mean rate of the failure-free windows just before and just after it."""
        r = self.ff_rates
        return [self.interval * (r[i] + r[i + 1]) / 2 for i in range(len(self.interval_steps))]

    @property
    def per_interval(self) -> list[float]:
        return [s / e for s, e in zip(self.interval_steps, self.expected_steps, strict=True)]

    @property
    def goodput(self) -> float:
        return self.useful_steps / sum(self.expected_steps)

    @property
    def goodput_settled(self) -> float:
        """Steps gained / the steps each interval would have gained at its own rate once the
        recovery had settled: no failure-free window enters, so load from other work that
        changes within a minute (a shared machine) does not either; a slowdown that outlasts
        ``SETTLE`` s after a failure is not charged."""
        return self.useful_steps / sum(self.interval * r for r in self.settled_rates)


#: Seconds after a failure from which a failure interval's own step rate is its settled rate.
SETTLE = 10.0


def goodput_run(cfg: Config, run: Run, interval: float, every: int) -> Goodput:
    """Failure-free windows of ``ff_window`` s alternate with failure intervals of
    ``interval`` s, each starting with a worker crash: F | crash, N | F | crash, N | ... | F.
    Each interval is compared with the rate of the windows on either side of it, so that
    load from other work drifting over the run (minutes) cancels out."""
    f, n = cfg.ff_window, interval
    with running(run, 10**9, out=False):
        run.wait_step(5, timeout=300)
        t0 = time.time() + 5.0
        fails = [t0 + f + i * (n + f) for i in range(cfg.failures)]
        end = fails[-1] + n + f
        for i, t in enumerate(fails):
            time.sleep(max(0.0, t - time.time()))
            # whatever runs now dies, recovered or not: failures do not wait for recoveries
            send_signal(run.live_worker_pid(i % cfg.nodes), signal.SIGKILL)
        time.sleep(max(0.0, end - time.time()) + 0.5)
        run.progress.poll()
    ranks = run.ranks
    at = run.progress.step_at
    steps = run.progress.of("step")
    ff = [(t0, t0 + f)] + [(t + n, t + n + f) for t in fails]
    gens = {e.gen for e in steps if any(t <= e.t <= t + n for t in fails)}
    before = max((e.gen for e in steps if e.t < fails[0]), default=None)  # training then
    return Goodput(
        run.system,
        interval,
        ff_rates=[(at(b, ranks) - at(a, ranks)) / (b - a) for a, b in ff],
        interval_steps=[at(t + n, ranks) - at(t, ranks) for t in fails],
        recoveries=len(gens - {before}),  # generations that trained in the intervals
        every=every,
        settled_rates=[(at(t + n, ranks) - at(t + SETTLE, ranks)) / (n - SETTLE) for t in fails],
    )


# -- report --------------------------------------------------------------------------------


def med(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def rng_of(xs: Sequence[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return ""
    return f"{min(xs):.2f}-{max(xs):.2f}"


def fmt(x: float, unit: str = "s", digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if unit == "ms":
        return f"{x * 1000:.{max(0, digits - 1)}f} ms"
    return f"{x:.{digits}f} s"


def report(
    cfg: Config,
    info: dict[str, Any],
    refs: dict[str, Reference],
    trials: list[Trial],
    floors: Floors,
    goodputs: list[Goodput],
    bl_every: int,
) -> str:
    lines: list[str] = []
    add = lines.append
    add("## Recovery (`benchmarks/recovery.py`)")
    add("")
    add(
        "What: time from a failure to the next completed training step, per failure kind, and "
        "goodput under a failure every N seconds; supervise vs the status quo (a "
        "torchrun-style launcher restarting every worker, the script checkpointing with "
        "`torch.save` to local disk and `torch.load`ing at start), side by side in one run, "
        f"on the same model: `supervise._demo.train --hidden {cfg.hidden}` (MLP + AdamW, "
        f"{floors.nbytes / 2**20:.1f} MiB of state per rank), {cfg.nodes} nodes x 1 worker, "
        "gloo on loopback."
    )
    add("")
    add(
        f"Machine: {info['machine']}; load average {info['load_start']} at the start, "
        f"{info['load_end']} at the end (1/5/15 min; other engineers share these cores: expect "
        f"noise). Measured {info['date']}, {info['duration_min']:.0f} min."
    )
    add("")
    bare, sv_ref, bl_ref = refs["bare"], refs[SUPERVISE], refs[BASELINE]
    add(
        f"Settings: supervise snapshots every {cfg.sv_every} steps (RAM, replicated to the "
        f"peer: {_replicated(cfg)}; keep_last 2), heartbeat_timeout {cfg.hang_timeout:g} s "
        f"(hang_detection {cfg.hang_detection}), peer_timeout "
        f"{cfg.peer_timeout:g} s (heartbeats every {cfg.heartbeat_interval:g} s), first "
        "restart without backoff (`recovery.backoff.initial = 0`; the default policy's 1 s "
        "would add 1 s to every recovery). Status quo: `torch.save` every "
        f"{bl_every} steps (Young's interval sqrt(2 x save time x 60 s) from its measured "
        f"save time {fmt(info['calibration']['save_s'], 'ms', 3)}, every rank saving its "
        f"{floors.nbytes / 2**20:.0f} MiB at once), gloo collective timeout "
        f"{cfg.hang_timeout:g} s (its only hang detector: torch's default is 30 min), launcher "
        f"polling every 0.1 s, {cfg.worker_shutdown:g} s grace before SIGKILL on both sides."
    )
    add("")
    add(
        f"Failure-free step time: bare training (no checkpoints) {fmt(bare.step_s, 'ms', 4)}; "
        f"supervise {fmt(sv_ref.step_s, 'ms', 4)} ({sv_ref.step_s / bare.step_s - 1:+.1%}); "
        f"status quo {fmt(bl_ref.step_s, 'ms', 4)} ({bl_ref.step_s / bare.step_s - 1:+.1%}) "
        f"({trial_steps(cfg)} steps each; final parameters of the three runs "
        f"{'identical' if info.get('refs_equal') else 'DIFFERENT'})."
    )
    add("")

    # per kind table
    add("### Time from failure to the next completed training step")
    add("")
    add(
        f"Median (and range) over {cfg.reps} trial(s) per kind and system; the ranks hit "
        "alternate; each trial is one failure in a run that must then finish with the "
        "failure-free run's parameters, bit for bit."
    )
    add("")
    add("| failure | supervise | status quo | ratio | lost steps, supervise | status quo |")
    add("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in cfg.kinds:
        sv = [t for t in trials if t.system == SUPERVISE and t.kind == kind]
        bl = [t for t in trials if t.system == BASELINE and t.kind == kind]
        a, b = med([t.total for t in sv]), med([t.total for t in bl])
        add(
            f"| {kind.replace('_', ' ')} | {fmt(a)} {_r(sv)} | {fmt(b)} {_r(bl)} | "
            f"{a / b:.2f}x | {_lost(sv)} | {_lost(bl)} |"
        )
    add("")
    add("Where the time goes (medians, seconds):")
    add("")
    sv_cols = ["detect", "select_checkpoint", "fetch", "process_start", "restore", "resume"]
    add("| supervise | " + " | ".join(c.replace("_", " ") for c in sv_cols) + " | other | total |")
    add("| --- |" + " ---: |" * (len(sv_cols) + 2))
    for kind in cfg.kinds:
        sv = [t for t in trials if t.system == SUPERVISE and t.kind == kind]
        cells = [fmt(med([t.phases.get(c, math.nan) for t in sv]), "s", 3) for c in sv_cols]
        other = fmt(med([t.phases.get("other", math.nan) for t in sv]), "s", 3)
        add(f"| {kind.replace('_', ' ')} | " + " | ".join(cells) + f" | {other} | "
            f"{fmt(med([t.total for t in sv]), 's', 3)} |")  # fmt: skip
    add("")
    bl_cols = ["detect", "stop_workers", "process_start", "restore", "resume"]
    add("| status quo | " + " | ".join(c.replace("_", " ") for c in bl_cols) + " | other | total |")
    add("| --- |" + " ---: |" * (len(bl_cols) + 2))
    for kind in cfg.kinds:
        bl = [t for t in trials if t.system == BASELINE and t.kind == kind]
        cells = [fmt(med([t.phases.get(c, math.nan) for t in bl]), "s", 3) for c in bl_cols]
        other = fmt(med([t.phases.get("other", math.nan) for t in bl]), "s", 3)
        add(f"| {kind.replace('_', ' ')} | " + " | ".join(cells) + f" | {other} | "
            f"{fmt(med([t.total for t in bl]), 's', 3)} |")  # fmt: skip
    add("")
    add("Process start split (the restarted worker that stepped last; medians over all trials):")
    add("")
    add("| | spawn | interpreter + imports | gloo rendezvous | model build + setup |")
    add("| --- | ---: | ---: | ---: | ---: |")
    for system in (SUPERVISE, BASELINE):
        ts = [t for t in trials if t.system == system]
        cells = [
            fmt(med([t.process.get(k, math.nan) for t in ts]), "s", 3)
            for k in ("spawn", "imports", "rendezvous", "build")
        ]
        add(
            f"| {'supervise' if system == SUPERVISE else 'status quo'} | "
            + " | ".join(cells)
            + " |"
        )
    add("")

    # targets
    add("### Targets")
    add("")
    pre, fresh = med(floors.prealloc["idle"]), med(floors.fresh["idle"])
    pre_loaded = med(floors.prealloc["loaded"])
    crash = [t for t in trials if t.system == SUPERVISE and t.kind == "crash"]
    restores = [max(t.detail.get("restores", {}).values(), default=math.nan) for t in crash]
    r_med = med(restores)
    ratio = r_med / pre
    add(
        f"- Worker crash, restore phase <= 1.5x a plain copy of the state: "
        f"**{'met' if ratio <= 1.5 else 'missed'}** — restore {fmt(r_med, 'ms', 4)} "
        f"(slowest node, median of {len(restores)}; range {rng_ms(restores)}) vs copying "
        f"{floors.nbytes / 2**20:.1f} MiB into a preallocated buffer {fmt(pre, 'ms', 3)} "
        f"(median of {len(floors.prealloc['idle'])} copies between the runs): **{ratio:.1f}x** "
        f"({r_med / pre_loaded:.1f}x the same copy taken while our training ran: "
        f"{fmt(pre_loaded, 'ms', 3)}). "
        f"Into freshly mapped memory (what a new process's tensors are) the copy takes "
        f"{fmt(fresh, 'ms', 3)}: restore = {r_med / fresh:.1f}x that."
    )
    nl = [t for t in trials if t.system == SUPERVISE and t.kind == "node_loss"]
    fr = [fetch_restore(t) for t in nl]
    bl_crash = [t for t in trials if t.system == BASELINE and t.kind in ("crash", "hang", "nan")]
    bl_nl = [t for t in trials if t.system == BASELINE and t.kind == "node_loss"]
    warm = med([t.phases.get("restore", math.nan) for t in bl_crash])
    cold = med([t.phases.get("restore", math.nan) for t in bl_nl])
    fr_med = med(fr)
    add(
        f"- Fetch + restore from peer RAM >= 5x faster than the disk baseline: "
        f"**{'met' if cold / fr_med >= 5 and warm / fr_med >= 5 else 'missed'}** — node "
        f"loss, replacement node's fetch + restore {fmt(fr_med, 'ms', 4)} (median of "
        f"{len(fr)}) vs the status quo's `torch.load` + `load_state_dict` of the same state "
        f"from disk {fmt(cold, 'ms', 4)} read cold (node loss trials: page cache evicted): "
        f"**{cold / fr_med:.1f}x**; {fmt(warm, 'ms', 4)} from the page cache (crash, hang, "
        f"NaN trials): **{warm / fr_med:.1f}x**."
    )
    g60 = [g for g in goodputs if g.system == SUPERVISE and g.interval == 60.0]
    if g60:
        g = g60[0]
        add(
            f"- Goodput >= 97% with a failure (worker crash) every 60 s: "
            f"**{'met' if g.goodput >= 0.97 else 'missed'}** — supervise "
            f"**{g.goodput:.1%}** against the failure-free windows, "
            f"**{g.goodput_settled:.1%}** against each interval's own settled rate"
            + "".join(
                f"; status quo {x.goodput:.1%} and {x.goodput_settled:.1%}"
                for x in goodputs
                if x.system == BASELINE and x.interval == 60.0
            )
            + "."
        )
    orphans = sorted({p for t in trials for p in t.detail.get("orphans", [])})
    unfinished = [t for t in trials if not t.detail.get("run_finished")]
    exact = info.get("exact", {})
    add(
        f"- Every injected failure: orphan processes found after the runs: {len(orphans)}; "
        f"runs that did not finish: {len({(t.system, t.rep) for t in unfinished})}; final "
        f"parameters equal to the failure-free run's: "
        + ", ".join(f"{k} {v}" for k, v in exact.items())
        + "."
    )
    add("")

    # goodput
    add("### Goodput under a failure every N seconds")
    add("")
    add(
        f"{cfg.failures} failure intervals of N seconds, each starting with a worker crash "
        f"(`kill -9`, ranks alternating), between failure-free windows of "
        f"{cfg.ff_window:g} s (F | crash, N | F | crash, N | ... | F); goodput = steps "
        "gained over the failure intervals / the steps they would have gained at the rate "
        "of the failure-free windows on either side of each (so that load from other work "
        "drifting over minutes cancels out). The checkpointing overhead is not in that "
        "figure; the last column charges it too: steps gained / (time in the failure "
        "intervals / the bare training's step time from the references above), which mixes "
        "two moments of a shared machine (noisier). *Settled*: steps gained / the steps each "
        f"interval would have gained at its own rate from {SETTLE:g} s after its failure on "
        "(no failure-free window enters: other work's load that changes within a minute "
        "does not either; a slowdown that outlasts those seconds is not charged)."
    )
    add("")
    add(
        "| N | system | checkpoint every | failure-free steps/s (range) | recoveries | "
        "steps gained | in | per interval | goodput | settled | vs bare training |"
    )
    add("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for g in goodputs:
        vs_bare = g.useful_steps * bare.step_s / g.window
        rates = f"{min(g.ff_rates):.2f}-{max(g.ff_rates):.2f}"
        each = " ".join(f"{x:.0%}" for x in g.per_interval)
        add(
            f"| {g.interval:g} s | {'supervise' if g.system == SUPERVISE else 'status quo'} | "
            f"{g.every} steps | {rates} | {g.recoveries} | {g.useful_steps} | "
            f"{g.window:.0f} s | {each} | **{g.goodput:.1%}** | {g.goodput_settled:.1%} | "
            f"{vs_bare:.1%} |"
        )
    add("")
    add("### Notes")
    add("")
    for note in info.get("notes", []):
        add(f"- {note}")
    add("")
    add(f"Reproduce: `.venv/bin/python benchmarks/recovery.py {info['argv']}`".rstrip() + "")
    return "\n".join(lines)


def fetch_restore(t: Trial) -> float:
    """The replacement node's fetch + restore (the node that fetched its shard)."""
    fetches = t.detail.get("fetches") or {}
    if not fetches:
        return math.nan
    node, fetch = max(fetches.items(), key=lambda kv: kv[1])
    restore = (t.detail.get("restores") or {}).get(node)
    return math.nan if restore is None else fetch + restore


def rng_ms(xs: Sequence[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    return f"{min(xs) * 1000:.1f}-{max(xs) * 1000:.1f} ms"


def _r(ts: Sequence[Trial]) -> str:
    r = rng_of([t.total for t in ts])
    return f"({r})" if r else ""


def _lost(ts: Sequence[Trial]) -> str:
    lost = [
        t.step_at_failure - (-1 if t.restored_step is None else t.restored_step)
        for t in ts
        if t.step_at_failure >= 0
    ]
    return f"{statistics.median(lost):g}" if lost else "-"


def write_results(text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (between its markers), or append it."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(new)


# -- main ----------------------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def parse(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048, help="demo model width (state size)")
    ap.add_argument("--reps", type=int, default=3, help="trials per failure kind and system")
    ap.add_argument("--kinds", default=",".join(KINDS), help="failure kinds to trial")
    ap.add_argument("--intervals", default="20,60", help="goodput: seconds between failures (list)")
    ap.add_argument("--failures", type=int, default=4, help="goodput: failure intervals")
    ap.add_argument(
        "--ff-window", type=float, default=20.0, help="goodput: failure-free window (s)"
    )
    ap.add_argument("--sv-every", type=int, default=5, help="supervise: snapshot every K steps")
    ap.add_argument(
        "--sv-preload",
        help="supervise: recovery.preload as a comma-separated list ('' = no spare workers)",
    )
    ap.add_argument(
        "--sv-replicate-every",
        type=float,
        default=0.0,
        help="supervise: replication.every_seconds (0: every snapshot is replicated)",
    )
    ap.add_argument(
        "--bl-every", type=int, default=0, help="status quo: checkpoint every K steps (0: Young)"
    )
    ap.add_argument("--hang-timeout", type=float, default=10.0)
    ap.add_argument(
        "--sv-hang-detection",
        choices=("adaptive", "timeout"),
        default="adaptive",
        help="supervise: recovery.hang_detection (timeout: heartbeat_timeout alone)",
    )
    ap.add_argument("--peer-timeout", type=float, default=2.0)
    ap.add_argument("--settle-steps", type=int, default=40, help="steps between two trials")
    ap.add_argument("--quick", action="store_true", help="1 trial per kind, goodput N=20 only")
    ap.add_argument("--skip-goodput", action="store_true")
    ap.add_argument("--skip-trials", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    cfg = Config(
        hidden=args.hidden,
        sv_every=args.sv_every,
        sv_preload=None
        if args.sv_preload is None
        else tuple(m.strip() for m in args.sv_preload.split(",") if m.strip()),
        sv_replicate_every=args.sv_replicate_every,
        bl_every=args.bl_every,
        hang_timeout=args.hang_timeout,
        hang_detection=args.sv_hang_detection,
        peer_timeout=args.peer_timeout,
        reps=args.reps,
        kinds=tuple(k for k in args.kinds.split(",") if k),
        intervals=tuple(float(x) for x in args.intervals.split(",") if x),
        failures=args.failures,
        ff_window=args.ff_window,
        settle_steps=args.settle_steps,
    )
    for k in cfg.kinds:
        if k not in KINDS:
            ap.error(f"--kinds: unknown kind {k!r} (known: {', '.join(KINDS)})")
    if args.quick:
        cfg.reps, cfg.intervals, cfg.failures, cfg.ff_window = 1, (20.0,), 2, 15.0
        cfg.settle_steps, cfg.ref_rounds = 30, 1
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse(argv)
    workdir = Path(tempfile.mkdtemp(prefix="recbench-"))
    cfg.workdir = workdir
    try:
        return measure(cfg, args, argv)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def measure(cfg: Config, args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """The whole benchmark in ``cfg.workdir``: calibration, references, trials, goodput."""
    from supervise._testing import OtlpSink

    t_start = time.time()
    workdir = cfg.workdir
    info: dict[str, Any] = {
        "machine": machine(),
        "load_start": load_average(),
        "date": time.strftime("%Y-%m-%d"),
        "argv": shlex.join(sys.argv[1:] if argv is None else argv),
        "notes": [],
    }
    print(f"work directory {workdir}; {info['machine']}; load {info['load_start']}")
    floors = Floors(state_bytes(cfg))
    floors.sample(idle=True)
    rng = random.Random(cfg.seed)
    sink = OtlpSink().start()
    try:
        # calibration: the status quo's save time and step time give its checkpoint interval
        print("calibration")
        calib = reference_run(BaselineRun(cfg, "calibration", every=10), 45)
        save_s = calib.save_s or 0.1
        bl_every = cfg.bl_every or young_interval(save_s, 60.0, calib.step_s)
        cfg.bl_every = bl_every
        info["calibration"] = {"step_s": calib.step_s, "save_s": save_s}
        print(f"  save {save_s * 1000:.0f} ms, step {calib.step_s * 1000:.0f} ms -> {bl_every}")

        # failure-free references, interleaved (also the bit-exactness reference)
        print("failure-free references")
        steps = trial_steps(cfg)
        refs_all: dict[str, list[Reference]] = {"bare": [], SUPERVISE: [], BASELINE: []}
        for rnd in range(cfg.ref_rounds):
            order = ["bare", SUPERVISE, BASELINE]
            order = order[rnd % 3 :] + order[: rnd % 3]
            for name in order:
                tag = (
                    f"ref-{rnd}-{'sv' if name == SUPERVISE else 'bl' if name == BASELINE else name}"
                )
                run: Run = (
                    SuperviseRun(cfg, tag, sink)
                    if name == SUPERVISE
                    else BaselineRun(cfg, tag, every=0 if name == "bare" else bl_every)
                )
                r = reference_run(run, steps)
                refs_all[name].append(r)
                print(f"  {name:24} {r.step_s * 1000:7.1f} ms/step")
                floors.sample(idle=True)
        refs = {
            k: Reference(
                k,
                steps,
                med([r.step_s for r in v]),
                all(r.finished for r in v),
                sorted({p for r in v for p in r.orphans}),
                save_s=med([r.save_s for r in v if r.save_s is not None])
                if k == BASELINE
                else None,
                final=v[0].final,
            )
            for k, v in refs_all.items()
        }
        info["refs"] = {k: [r.step_s for r in v] for k, v in refs_all.items()}
        finals = [r.final for v in refs_all.values() for r in v]
        assert refs["bare"].final is not None, "the failure-free run wrote no parameters"
        reference = refs["bare"].final
        info["refs_equal"] = all(f is not None and same_params(f, reference) for f in finals)

        # per-kind trials, the systems' runs interleaved
        trials: list[Trial] = []
        exact: dict[str, list[int]] = {}
        for rep in range(0 if args.skip_trials else cfg.reps):
            order = list(cfg.kinds)
            rng.shuffle(order)
            for system in (SUPERVISE, BASELINE) if rep % 2 == 0 else (BASELINE, SUPERVISE):
                print(f"trials, rep {rep}, {system}: {', '.join(order)}")
                if system == SUPERVISE:
                    sink.clear()
                    run = SuperviseRun(
                        cfg, f"trials-sv-{rep}", sink, span_delay_ms=TRIAL_SPAN_DELAY_MS
                    )
                else:
                    run = BaselineRun(cfg, f"trials-bl-{rep}", every=bl_every)
                got = trial_run(cfg, run, rep, order, floors, rng)
                trials.extend(got)
                key = "supervise" if system == SUPERVISE else "status quo"
                ok = run.out.exists() and same_params(run.out, reference)
                exact.setdefault(key, [0, 0])
                exact[key][0] += ok
                exact[key][1] += 1
                floors.sample(idle=True)  # between runs: the machine without our training
        info["exact"] = {k: f"{a}/{b} runs" for k, (a, b) in exact.items()}

        # goodput
        goodputs: list[Goodput] = []
        if not args.skip_goodput:
            for interval in cfg.intervals:
                k_bl = (
                    young_interval(save_s, interval, calib.step_s)
                    if not args.bl_every
                    else bl_every
                )
                for system in (SUPERVISE, BASELINE):
                    print(f"goodput, a crash every {interval:g} s, {system}")
                    if system == SUPERVISE:
                        sink.clear()
                        run = SuperviseRun(cfg, f"goodput-sv-{interval:g}", sink)
                        g = goodput_run(cfg, run, interval, cfg.sv_every)
                    else:
                        run = BaselineRun(cfg, f"goodput-bl-{interval:g}", every=k_bl)
                        g = goodput_run(cfg, run, interval, k_bl)
                    print(
                        f"  goodput {g.goodput:.1%} ({g.useful_steps} steps, "
                        f"{g.recoveries} recoveries)"
                    )
                    goodputs.append(g)
                    floors.sample(idle=True)
    finally:
        sink.stop()
    info["load_end"] = load_average()
    info["duration_min"] = (time.time() - t_start) / 60
    info["notes"] = notes(cfg, trials, floors)
    text = report(cfg, info, refs, trials, floors, goodputs, bl_every)
    print()
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": {k: str(v) for k, v in asdict(cfg).items()},
                    "info": info,
                    "references": {
                        k: {**asdict(v), "final": str(v.final)} for k, v in refs.items()
                    },
                    "trials": [{**asdict(t), "total": t.total} for t in trials],
                    "floors": {
                        "bytes": floors.nbytes,
                        "prealloc": floors.prealloc,
                        "fresh": floors.fresh,
                    },
                    "goodput": [
                        {
                            **asdict(g),
                            "goodput": g.goodput,
                            "goodput_settled": g.goodput_settled,
                            "per_interval": g.per_interval,
                        }
                        for g in goodputs
                    ],
                },
                indent=1,
                default=str,
            )
        )
    if not args.no_write:
        write_results(text)
        print(f"wrote {RESULTS}")
    return 0


def notes(cfg: Config, trials: list[Trial], floors: Floors) -> list[str]:
    out = []
    bad = [t for t in trials if t.detail.get("error")]
    if bad:
        out.append(f"{len(bad)} trial(s) could not be analysed: {[t.detail['error'] for t in bad]}")
    multi = [t for t in trials if t.detail.get("attempts", 1) > 1]
    if multi:
        out.append(f"{len(multi)} supervise recoveries needed more than one attempt")
    dual = [t for t in trials if t.detail.get("recovery_traces", 1) > 1]
    if dual:
        out.append(
            f"{len(dual)} supervise failure(s) started more than one recovery trace between the "
            "failure and the resumption: "
            + ", ".join(f"{t.kind} of rank {t.rank} ({t.detail['recovery_traces']})" for t in dual)
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
