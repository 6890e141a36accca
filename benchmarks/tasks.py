"""Resumable tasks on one machine: what a commit costs per step, and what resuming saves.

Side by side in one run, attempts in real worker processes (`run_local`):

1. Commit overhead: a task holding 10 MiB of state (`ctx.state`) runs 20 short steps, once
   committing after every step (the default) and once only at its end (`Manual`); the
   difference per step is the commit's cost, shown as a share of a 1 s step. Journals: in the
   supervising process's RAM (`JournalHost`, the default) and on disk (fsynced files).
2. Resume vs restart (seed 004's table): a 10-step task is killed (SIGKILL) in the middle of the
   step at 25/50/75/90% of its work; the time to completion when the next attempt resumes from
   the journal, against restarting from scratch (the same task with no step replayed).
3. The farm (3 `supervise node --tasks` agents on loopback, policies/demo.toml): scheduling
   throughput (1,000 tiny tasks from the first submit to the last completion, nothing lost or
   duplicated; measured once the farm has settled: every node's warm task workers started and
   the farm idle, as a long-lived farm is; with the CPU each task cost, by process), then the
   takeover after a node loss: kill -9 of a node (agent and every process
   under it) in the middle of a task's step, to that step running again on another node.

    .venv/bin/python benchmarks/tasks.py              # prints, updates RESULTS.md
    .venv/bin/python benchmarks/tasks.py --no-write   # prints only
    .venv/bin/python benchmarks/tasks.py --farm-only  # section 3 only (its part of RESULTS.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import trio

from supervise._testing.cluster import LocalCluster, kill_node
from supervise._testing.procs import descendants
from supervise.policy import Policy
from supervise.runtime import ProcessHandle
from supervise.runtime.procfs import cpu_seconds
from supervise.tasks import Manual, TaskContext, TaskPolicy, TaskSpec, run_local, unwrap

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- tasks:begin -->", "<!-- tasks:end -->"
FARM_BEGIN, FARM_END = "<!-- tasks-farm:begin -->", "<!-- tasks-farm:end -->"
FARM_POLICY = HERE.parent / "policies" / "demo.toml"
FARM_NODES = 3
FARM_CPUS = 4  # each node's --cpus
FARM_TASKS = 1000
TINY_CPU = 0.25  # a tiny task's need: 16 at once per node
TAKEOVER_STEPS = 12
TAKEOVER_STEP_S = 0.3
READY_S = 90.0  # agents starting, offering their capacity to the coordinator
SETTLED_CPU = 0.05  # the farm is idle below this share of a core (over SETTLE_S)
SETTLE_S = 0.5
IN_FLIGHT = 8  # client requests at a time
STATE_MIB = 10
COMMIT_STEPS = 20
STEP_S = 0.05
RESUME_STEPS = 10
RESUME_STEP_S = 0.3
FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return 1


async def state_task(ctx: TaskContext, steps: int, mib: int, step_s: float) -> float:
    """``steps`` steps of ``step_s`` with ``mib`` MiB of state; seconds from first to last."""
    if "w" not in ctx.state:
        ctx.state["w"] = np.zeros(mib * 2**20 // 8)
    t0 = time.perf_counter()
    for i in range(steps):
        await ctx.step(f"s{i}", _sleep, step_s)
        ctx.state["w"][i] = i  # the state changes between steps
    if not isinstance(ctx._cadence.spec, Manual):
        return time.perf_counter() - t0
    await ctx.checkpoint()
    return time.perf_counter() - t0


def _mark(log: str, i: int) -> int:
    with open(log, "a") as f:
        f.write(f"{i}\n")
    time.sleep(RESUME_STEP_S)
    return i


async def steps_task(ctx: TaskContext, log: str, restart: bool) -> int:
    """RESUME_STEPS steps; with ``restart`` nothing is replayed (step names per attempt)."""
    total = 0
    for i in range(RESUME_STEPS):
        name = f"s{i}-a{ctx.attempt}" if restart else f"s{i}"
        total += await ctx.step(name, _mark, log, i)
    return total


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(HERE)}


async def commit_overhead(tmp: Path) -> list[tuple[str, float, float]]:
    out = []
    for journal in ("ram", "disk"):
        times = {}
        for label, policy in (("every", TaskPolicy()), ("manual", TaskPolicy(checkpoint=Manual()))):
            best = float("inf")
            for rep in range(3):
                spec = TaskSpec(
                    "tasks:state_task", (COMMIT_STEPS, STATE_MIB, STEP_S), policy=policy
                )
                r = await run_local(
                    spec, tmp / f"c-{journal}-{label}-{rep}", journal=journal, env=_env()
                )
                best = min(best, unwrap(r))
            times[label] = best
        per_step = (times["every"] - times["manual"]) / COMMIT_STEPS
        out.append((journal, per_step, per_step / 1.0))
    return out


async def one_run(tmp: Path, fraction: float | None, restart: bool) -> float:
    log = tmp / f"log-{fraction}-{restart}"
    spec = TaskSpec("tasks:steps_task", (str(log), restart))
    kill_at = None if fraction is None else int(fraction * RESUME_STEPS)

    async def killer(handle: ProcessHandle) -> None:
        while not (log.exists() and f"{kill_at}\n" in log.read_text()):  # noqa: ASYNC110
            await trio.sleep(0.005)
        await trio.sleep(RESUME_STEP_S / 2)
        os.kill(handle.pid, signal.SIGKILL)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:

        def started(attempt: int, handle: ProcessHandle) -> None:
            if kill_at is not None and attempt == 1:
                nursery.start_soon(killer, handle)

        result = await run_local(
            spec, tmp / f"r-{fraction}-{restart}", env=_env(), on_started=started
        )
    unwrap(result)
    return time.perf_counter() - t0


async def resume_vs_restart(tmp: Path) -> tuple[float, list[tuple[float, float, float]]]:
    clean = await one_run(tmp, None, False)
    rows = []
    for f in FRACTIONS:
        rows.append((f, await one_run(tmp, f, False), await one_run(tmp, f, True)))
    return clean, rows


# -- 3. the farm ----------------------------------------------------------------------------


async def tiny(ctx: TaskContext, i: int, log: str) -> int:
    """A task with next to nothing to do (one line appended to ``log``: its executions are
    counted): what a task costs the farm itself."""
    with open(log, "a") as f:
        f.write(f"{i}\n")
    return i


def _stamp(log: str, i: int, node: str) -> int:
    with open(log, "a") as f:
        f.write(f"{i} {node} {time.time()!r}\n")
    time.sleep(TAKEOVER_STEP_S)
    return i


async def node_steps(ctx: TaskContext, log: str) -> int:
    """TAKEOVER_STEPS steps, each logging its start (step, node, wall time)."""
    total = 0
    for i in range(TAKEOVER_STEPS):
        total += await ctx.step(f"s{i}", _stamp, log, i, ctx.node)
    return total


def _starts(log: Path) -> list[tuple[int, str, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((int(parts[0]), parts[1], float(parts[2])))
    return out


@attrs.frozen(slots=True)
class FarmFigures:
    """What section 3 measured."""

    tasks: int
    seconds: float  # first submit to the last completion seen
    cpu_ms: dict[str, float]  # CPU per task by process kind (agents, task workers, client)
    submit_seconds: float  # first submit to the last submit answered
    lost: int  # tasks without their right result
    duplicated: int  # executions beyond one per task
    peer_timeout: float
    lost_node: int
    lost_step: int
    resumed_node: str
    resumed_step: int
    takeover: float  # kill -> the lost step running again elsewhere
    reran: int  # finished steps that ran again (must be 0)

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


async def _ready(farm: Any) -> None:
    """Wait until the farm runs a task (a coordinator, offers in)."""
    from supervise.tasks.farm import FarmError

    deadline = time.monotonic() + READY_S
    while True:
        try:
            ref = await farm.submit(
                "tasks:tiny", -1, str(os.devnull), cpu=TINY_CPU, task_id="warm-up"
            )
            await ref.result(timeout=READY_S)
            return
        except (FarmError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the farm never ran a task: {exc}") from None
            try:
                await farm.result("warm-up", timeout=1.0)
                return
            except (FarmError, TimeoutError):
                await trio.sleep(0.5)


def _farm_cpu(agents: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the farm's agents, the processes under them (task workers)
    and this client."""
    out = {"agents": 0.0, "task workers": 0.0, "client": cpu_seconds(os.getpid()) or 0.0}
    for agent in agents:
        out["agents"] += cpu_seconds(agent) or 0.0
        out["task workers"] += sum(cpu_seconds(pid) or 0.0 for pid in descendants(agent))
    return out


async def _settled(agents: list[int], workers: int) -> None:
    """Wait until ``workers`` task workers run under the agents and the farm is idle (what a
    long-lived farm is when tasks arrive; a farm still starting spends its CPU on imports)."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        before = sum(_farm_cpu(agents).values())
        await trio.sleep(SETTLE_S)
        busy = (sum(_farm_cpu(agents).values()) - before) / SETTLE_S
        started = sum(len(descendants(a)) for a in agents)
        if started >= workers and busy < SETTLED_CPU:
            return
    raise RuntimeError(f"the farm did not settle within {READY_S:g} s")


async def _throughput(
    farm: Any, agents: list[int], n: int, log: Path
) -> tuple[float, float, int, int, dict[str, float]]:
    """Submit ``n`` tiny tasks and wait for each one's result (IN_FLIGHT requests at a time);
    (seconds from the first submit to the last result, submit seconds, lost: tasks without
    their right result, duplicated: executions beyond one per task, CPU ms per task by
    process kind)."""
    ids = [f"tiny-{i}" for i in range(n)]
    limiter = trio.CapacityLimiter(IN_FLIGHT)
    values: dict[int, Any] = {}
    failures: list[str] = []  # e.g. dead-lettered after leases lapsed on a loaded machine
    submitted = trio.Event()

    async def submit(i: int) -> None:
        async with limiter:
            await farm.submit("tasks:tiny", i, str(log), cpu=TINY_CPU, task_id=ids[i])

    async def fetch(i: int) -> None:
        from supervise.tasks import TaskFailed
        from supervise.tasks.farm import FarmError

        await submitted.wait()
        async with limiter:
            try:
                values[i] = await farm.result(ids[i], timeout=600.0)
            except (TaskFailed, FarmError, TimeoutError) as exc:
                failures.append(str(exc))

    cpu0 = _farm_cpu(agents)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(fetch, i)
        async with trio.open_nursery() as submits:
            for i in range(n):
                submits.start_soon(submit, i)
        submit_seconds = time.perf_counter() - t0
        submitted.set()
    seconds = time.perf_counter() - t0
    cpu = {k: (v - cpu0[k]) * 1000 / n for k, v in _farm_cpu(agents).items()}
    lost = sum(1 for i in range(n) if values.get(i) != i)
    runs = log.read_text().split() if log.exists() else []
    duplicated = len(runs) - len(set(runs))
    if failures:
        print(f"{len(failures)} tiny tasks did not complete; the first: {failures[0]}")
    return seconds, submit_seconds, lost, duplicated, cpu


async def _takeover(farm: Any, cluster: LocalCluster, tmp: Path) -> dict[str, Any]:
    """Two long tasks, each needing a whole node (so one runs off the coordinator, rank 0, and
    a third node is free); kill -9 of the non-coordinator node running one of them in the
    middle of a step; the time from the kill to that step starting on another node."""
    logs = {name: tmp / f"{name}.log" for name in ("long-a", "long-b")}
    for name, log in logs.items():
        await farm.submit("tasks:node_steps", str(log), cpu=FARM_CPUS, task_id=name)
    victim: tuple[str, int, int] | None = None
    deadline = time.monotonic() + 120.0
    while victim is None:
        if time.monotonic() > deadline:
            raise RuntimeError("no long task ran a step off the coordinator within 120 s")
        now = time.time()
        for name, log in logs.items():
            starts = _starts(log)
            if not starts:
                continue
            i, node, at = starts[-1]
            if node != "0" and i >= 2 and now - at < 0.4 * TAKEOVER_STEP_S:
                victim = (name, int(node), i)
        await trio.sleep(0.01)
    name, rank, step = victim
    agent = cluster.agents[rank]
    cluster.book.add_descendants(agent.pid, f"agent {rank}")
    pids = descendants(agent.pid)
    at = time.time()
    kill_node(agent.pid, pids, agent.shm_dir)
    resumed: tuple[int, str, float] | None = None
    deadline = time.monotonic() + 120.0
    while resumed is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not resume within 120 s of the loss of node {rank}")
        resumed = next((s for s in _starts(logs[name]) if s[2] > at and s[1] != str(rank)), None)
        await trio.sleep(0.01)
    total = await farm.result(name, timeout=120.0)
    assert total == sum(range(TAKEOVER_STEPS)), total
    counts: dict[int, int] = {}
    for i, _node, _t in _starts(logs[name]):
        counts[i] = counts.get(i, 0) + 1
    reran = sum(c - 1 for i, c in counts.items() if i != step)
    return {
        "lost_node": rank,
        "lost_step": step,
        "resumed_node": resumed[1],
        "resumed_step": resumed[0],
        "takeover": resumed[2] - at,
        "reran": reran,
    }


async def farm_bench(tmp: Path, tasks: int = FARM_TASKS) -> FarmFigures:
    """Section 3 on a fresh 3-node farm (every process stopped by PID at the end)."""
    from supervise.tasks.farm import Farm

    peer_timeout = Policy.from_toml(FARM_POLICY).cluster.peer_timeout
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    workdir = tmp / "farm"
    workdir.mkdir()
    with LocalCluster(workdir, FARM_NODES, command=[], policy=FARM_POLICY, env=env) as cluster:
        cluster.options = ["--tasks", "--cpus", str(FARM_CPUS)]
        agents = [agent.pid for agent in cluster.start_all()]
        async with Farm(nodes=cluster.endpoints, timeout=120.0) as farm:
            await _ready(farm)
            await _settled(agents, FARM_NODES * FARM_CPUS)  # one warm worker per core
            seconds, submitted, lost, duplicated, cpu = await _throughput(
                farm, agents, tasks, tmp / "tiny.log"
            )
            takeover = await _takeover(farm, cluster, tmp)
        cluster.stop(grace_s=30.0)
    return FarmFigures(tasks, seconds, cpu, submitted, lost, duplicated, peer_timeout, **takeover)


def _farm_report(f: FarmFigures) -> str:
    target = f.peer_timeout + 1.0
    return "\n".join(
        [
            FARM_BEGIN,
            f"The farm: {FARM_NODES} `supervise node --tasks --cpus {FARM_CPUS}` agents on loopback"
            " (policies/demo.toml), every task in a worker process under its node's agent.",
            "",
            "| measure | result | target |",
            "| --- | --- | --- |",
            f"| scheduling throughput: {f.tasks} tiny tasks (cpu {TINY_CPU:g} each) on the settled"
            f" farm, first submit to the last result ({IN_FLIGHT} requests in flight) |"
            f" {f.rate:.1f} tasks/s"
            f" ({f.seconds:.1f} s; submits answered"
            f" in {f.submit_seconds:.1f} s); lost {f.lost}, duplicated {f.duplicated} | >= 200"
            " tasks/s |",
            f"| takeover after a node loss: kill -9 of node {f.lost_node} (agent and every process"
            f" under it) in step {f.lost_step} of a {TAKEOVER_STEPS} x {TAKEOVER_STEP_S:g} s task,"
            f" to that step running on node {f.resumed_node} | {f.takeover:.2f} s (resumed at"
            f" step {f.resumed_step}; finished steps run again: {f.reran}) | <= peer_timeout"
            f" + 1 s = {target:g} s |",
            "",
            "CPU per tiny task (all of the farm's processes, ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in f.cpu_ms.items())
            + f"; {sum(f.cpu_ms.values()):.2f} in all.",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared with other engineers'"
            f" test runs (load average {os.getloadavg()[0]:.1f} at the end).",
            FARM_END,
        ]
    )


def _report(
    commits: list[tuple[str, float, float]], clean: float, rows: list[Any], farm: FarmFigures
) -> str:
    lines = [
        BEGIN,
        "## Resumable tasks (`benchmarks/tasks.py`)",
        "",
        f"Commit overhead: a task holding {STATE_MIB} MiB of state runs {COMMIT_STEPS} steps in a "
        "worker process, committing after every step (the default) vs only at its end "
        "(`Manual`); best of 3, the difference per step. Each commit encodes the state and "
        "writes it (and every step result so far) to the journal.",
        "",
        "| journal | commit cost per step | share of a 1 s step |",
        "| --- | --- | --- |",
    ]
    for journal, per_step, share in commits:
        where = "RAM arenas of the supervising process" if journal == "ram" else "disk (fsync)"
        lines.append(f"| {where} | {per_step * 1000:.1f} ms | {share * 100:.1f}% |")
    lines += [
        "",
        f"Resume vs restart: a task of {RESUME_STEPS} steps x {RESUME_STEP_S:g} s, its worker "
        "killed (SIGKILL) half-way through the step at each point; wall time from submit to "
        f"completion, worker start-ups included. A failure-free run: {clean:.2f} s.",
        "",
        "| failure at | resume (journal) | restart from scratch | time lost: resume / restart |",
        "| --- | --- | --- | --- |",
    ]
    for f, resume, restart in rows:
        lines.append(
            f"| {f * 100:.0f}% | {resume:.2f} s | {restart:.2f} s | "
            f"{resume - clean:+.2f} s / {restart - clean:+.2f} s |"
        )
    lines += ["", _farm_report(farm)]
    lines += [
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; shared with other work (load average "
        f"{os.getloadavg()[0]:.1f} at the end: noisy, compare within a row).",
        "Reproduce: `.venv/bin/python benchmarks/tasks.py`.",
        END,
    ]
    return "\n".join(lines)


def _replace(text: str, begin: str, end: str, report: str) -> str:
    if begin in text:
        return re.sub(
            re.escape(begin) + ".*?" + re.escape(end), lambda _m: report, text, flags=re.S
        )
    return text.rstrip() + "\n" + report + "\n"


async def main(write: bool, farm_only: bool, farm_tasks: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if farm_only:
            report = _farm_report(await farm_bench(tmp, farm_tasks))
            print(report)
            if write:
                text = RESULTS.read_text()
                if FARM_BEGIN not in text:
                    raise SystemExit("RESULTS.md has no farm part yet: run the whole benchmark")
                RESULTS.write_text(_replace(text, FARM_BEGIN, FARM_END, report))
            return
        commits = await commit_overhead(tmp)
        clean, rows = await resume_vs_restart(tmp)
        farm = await farm_bench(tmp, farm_tasks)
    report = _report(commits, clean, rows, farm)
    print(report)
    if write:
        RESULTS.write_text(_replace(RESULTS.read_text(), BEGIN, END, report))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--farm-only", action="store_true", help="section 3 only")
    parser.add_argument(
        "--farm-tasks",
        type=int,
        default=FARM_TASKS,
        metavar="N",
        help=f"tiny tasks through the farm (default {FARM_TASKS})",
    )
    opts = parser.parse_args()
    if opts.farm_tasks < 1:
        parser.error(f"--farm-tasks {opts.farm_tasks}: must be >= 1")
    sys.exit(trio.run(main, not opts.no_write, opts.farm_only, opts.farm_tasks))
