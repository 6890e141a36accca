"""The farm demo from start to end: start the farm nodes, submit the pipelines, lose a node in
the middle of a step, collect every result, compute the failure-free reference in-process,
check, and make sure no process is left."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import trio

from supervise._demo.cluster import ClusterSpec, DemoCluster, DemoFailure
from supervise._demo.farm.checks import farm_checks
from supervise._demo.farm.config import NODE_CPUS, TASK_CPUS, FarmDemoConfig
from supervise._demo.farm.pipeline import STAGES, TARGET, same
from supervise._demo.farm.records import (
    NodeLoss,
    StepRun,
    TaskView,
    read_runs,
    running_at,
    state_changes,
    takeovers,
)
from supervise._demo.farm.result import FarmResult
from supervise._demo.result import Narrator
from supervise._demo.scenario import _endpoints, _kill, _shm_root, _survivors, packaged_policy
from supervise._testing.cluster import kill_node
from supervise._testing.procs import PidBook, descendants
from supervise.policy import Policy
from supervise.tasks import InProcess, MemoryJournal, TaskRunner, TaskSpec, unwrap

SUBMIT_LIMIT_S = 60.0  # the farm nodes start (python, imports) and offer to the coordinator
COORDINATOR = 0  # the lowest live rank coordinates: the demo loses another node


async def run_farm_demo(config: FarmDemoConfig, out: TextIO, *, run_dir: Path) -> FarmResult:
    """Run the whole farm demo in ``run_dir`` (from `prepare_run_dir`), telling ``out`` as it
    goes; the result says what held (``result.ok``)."""
    policy_path = (config.policy or packaged_policy()).resolve()
    policy = Policy.from_toml(policy_path)
    result = FarmResult(config, policy_path, policy.cluster.peer_timeout, run_dir, time.time())
    say = Narrator(out, result.started_at)
    shutil.copyfile(policy_path, run_dir / "policy.toml")
    effects = run_dir / "effects"
    effects.mkdir()
    shm_root = _shm_root()
    book = PidBook()
    spec = ClusterSpec(
        endpoints=_endpoints(config.nodes),
        policy=run_dir / "policy.toml",
        command=(),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        run_dir=run_dir,
        shm_root=shm_root,
        options=("--tasks", "--cpus", str(NODE_CPUS)),
    )
    _introduce(say, result)
    values: dict[str, Any] = {}
    try:
        with trio.CancelScope() as interruptible:
            async with trio.open_nursery() as watch:
                watch.start_soon(_interrupt_on_signal, interruptible, result, say)
                try:
                    await _run_farm(
                        config=config,
                        spec=spec,
                        book=book,
                        effects=effects,
                        result=result,
                        values=values,
                        say=say,
                    )
                except DemoFailure as exc:
                    result.failure = str(exc)
                    say(f"FAILED: {exc}")
                watch.cancel_scope.cancel()
    finally:
        if not config.keep_shm:
            shutil.rmtree(shm_root, ignore_errors=True)
    settle(result, read_runs(effects))
    if result.interrupted is None:
        await _reference(config, run_dir, result, values, say)
    result.survivors = await _survivors(book)
    result.processes_seen = len(book)
    if result.survivors:
        _kill(result.survivors)
    result.checks = farm_checks(result)
    return result


def settle(result: FarmResult, runs: list[StepRun]) -> None:
    """Attach the recorded step executions to the result: to each task, and to the loss (the
    tasks cut there, the takeovers)."""
    result.runs = runs
    for view in result.tasks:
        view.runs = [r for r in runs if r.task == view.task_id]
    loss = result.loss
    if loss is not None:
        cut = sorted({r.task for r in running_at(runs, loss.at) if r.node == str(loss.rank)})
        result.loss = NodeLoss(loss.rank, loss.at, loss.agent_pid, loss.pids, tuple(cut))
        result.takeovers = takeovers(runs, result.loss)


def _introduce(say: Narrator, result: FarmResult) -> None:
    config = result.config
    say(
        f"supervise demo --tasks: a farm of {config.nodes} node agents on 127.0.0.1 runs"
        f" {config.tasks} pipelines ({', '.join(STAGES)}; {config.step_delay:g} s a step),"
        " and loses a node in the middle of a step"
    )
    say(f"  files: {result.run_dir}")
    say(
        f"  each node: supervise node --tasks --cpus {NODE_CPUS} (a pipeline asks for"
        f" {TASK_CPUS});"
        f" policy {result.policy_path.name}: peer_timeout {result.peer_timeout:g} s"
    )


async def _interrupt_on_signal(scope: trio.CancelScope, result: FarmResult, say: Narrator) -> None:
    """SIGINT or SIGTERM: stop every agent (and its workers), then report what happened."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            result.interrupted = name
            result.failure = f"interrupted by {name}"
            say(f"{name}: stopping every agent and worker, then checking that none is left")
            scope.cancel()
            return


async def _run_farm(
    *,
    config: FarmDemoConfig,
    spec: ClusterSpec,
    book: PidBook,
    effects: Path,
    result: FarmResult,
    values: dict[str, Any],
    say: Narrator,
) -> None:
    from supervise.tasks.farm import Farm

    async with trio.open_nursery() as nursery:
        cluster: DemoCluster = await nursery.start(DemoCluster(spec, book).run)
        try:
            for rank in range(config.nodes):
                agent = await cluster.start_agent(rank)
                say(f"node {rank}: farm agent pid {agent.pid} on {spec.endpoints[rank]}")
            with trio.move_on_after(config.limit_s) as limit:
                async with Farm(nodes=list(spec.endpoints)) as farm:
                    await _submit_all(
                        farm=farm,
                        config=config,
                        effects=effects,
                        result=result,
                        say=say,
                        cluster=cluster,
                    )
                    await _run_through_loss(
                        farm, cluster, config, effects, result, values, book, say
                    )
                    result.farm_finished_at = time.time()
            if limit.cancelled_caught:
                raise DemoFailure(
                    f"the farm did not finish every task within {config.limit_s:.0f} s"
                )
        except DemoFailure as exc:  # caught here: out of the nursery it would be a group
            result.failure = str(exc)
            say(f"FAILED: {exc}")
        say("stopping the farm (SIGTERM to every agent)")
        nursery.cancel_scope.cancel()


async def _run_through_loss(  # noqa: PLR0917 (one call site, the arguments in one place)
    farm: Any,
    cluster: DemoCluster,
    config: FarmDemoConfig,
    effects: Path,
    result: FarmResult,
    values: dict[str, Any],
    book: PidBook,
    say: Narrator,
) -> None:
    """Collect every result while a node is lost; DemoFailure if the loss could not be made."""
    failure: list[DemoFailure] = []

    async def lose(results: trio.Nursery) -> None:
        try:
            await _lose_a_node(
                cluster=cluster, config=config, effects=effects, result=result, book=book, say=say
            )
        except DemoFailure as exc:
            failure.append(exc)
            results.cancel_scope.cancel()

    async with trio.open_nursery() as results:
        for view in result.tasks:
            results.start_soon(_collect, farm, view, values, say)
        results.start_soon(lose, results)
    if failure:
        raise failure[0]


async def _submit_all(
    *,
    farm: Any,
    config: FarmDemoConfig,
    effects: Path,
    result: FarmResult,
    say: Narrator,
    cluster: DemoCluster,
) -> None:
    """Submit every pipeline, retrying while the farm is still starting (no coordinator yet, or
    no node has offered its capacity)."""
    from supervise.tasks.farm import FarmError

    deadline = trio.current_time() + SUBMIT_LIMIT_S
    for seed, task_id in enumerate(config.task_ids, 1):
        while True:
            problem = cluster.problem()
            if problem:
                raise DemoFailure(problem)
            try:
                await farm.submit(
                    TARGET, str(effects), seed, config.step_delay, cpu=TASK_CPUS, task_id=task_id
                )
                break
            except FarmError as exc:
                try:  # a submit whose reply was lost is there already
                    await farm.show(task_id)
                    break
                except FarmError:
                    pass
                if trio.current_time() > deadline:
                    raise DemoFailure(f"submit {task_id}: {exc}") from None
                await trio.sleep(0.3)
        if result.farm_started_at is None:
            result.farm_started_at = time.time()
        result.tasks.append(TaskView(task_id, seed))
    say(f"submitted {config.tasks} pipelines: {', '.join(config.task_ids)}")


def _victim(runs: list[StepRun], pace: float, relaxed: bool) -> StepRun | None:
    """A step running now on a node other than the coordinator: one early enough in its step
    to be cut in the middle, after at least two finished steps (one, ``relaxed``)."""
    now = time.time()
    for run in sorted(runs, key=lambda r: -r.started):
        if run.done is not None or run.node == str(COORDINATOR):
            continue
        if STAGES.index(run.step) >= (1 if relaxed else 2) and now - run.started < 0.6 * pace:
            return run
    return None


async def _lose_a_node(
    *,
    cluster: DemoCluster,
    config: FarmDemoConfig,
    effects: Path,
    result: FarmResult,
    book: PidBook,
    say: Narrator,
) -> None:
    """Wait for a task in the middle of a step on a node other than the coordinator, then
    kill -9 that node's agent and every process under it (by PID), and drop its RAM."""
    started = trio.current_time()
    patience = len(STAGES) * config.step_delay * 2 + 10.0
    while True:
        problem = cluster.problem()
        if problem:
            raise DemoFailure(problem)
        runs = read_runs(effects)
        relaxed = trio.current_time() - started > patience
        run = _victim(runs, config.step_delay, relaxed)
        if run is not None:
            break
        if relaxed and len([r for r in runs if r.done is not None]) >= len(STAGES) * config.tasks:
            raise DemoFailure("every step finished before a node other than 0 ran one")
        await trio.sleep(0.02)
    rank = int(run.node)
    agent = cluster.current(rank)
    book.add_descendants(agent.pid, agent.name)
    pids = tuple(descendants(agent.pid))
    agent.killed = True
    at = time.time()
    kill_node(agent.pid, pids, agent.shm_dir)
    result.loss = NodeLoss(rank, at, agent.pid, pids, (run.task,))
    say(
        f"NODE LOSS: kill -9 of node {rank} (agent pid {agent.pid} and {len(pids)} processes"
        f" under it) while {run.task} ran '{run.step}' (attempt {run.attempt}, worker pid"
        f" {run.pid}); its RAM is dropped"
    )


async def _collect(farm: Any, view: TaskView, values: dict[str, Any], say: Narrator) -> None:
    """Wait for one task's result, then ask for its states."""
    from supervise.tasks import TaskFailed
    from supervise.tasks.farm import FarmError

    try:
        values[view.task_id] = await farm.result(view.task_id)
    except (FarmError, TaskFailed, TimeoutError) as exc:
        view.error = f"{type(exc).__name__}: {exc}"
    try:
        info = await farm.show(view.task_id)
    except FarmError as exc:
        view.error = view.error or f"show: {exc}"
        return
    view.state = str(info.state)
    view.attempts = int(info.attempt)
    view.states = state_changes(info.history)
    if view.error is None and info.error:
        view.error = str(info.error)
    where = "" if info.node is None else f" on node {info.node}"
    say(f"{view.task_id}: {view.state}{where} (attempt {view.attempts})")


async def _reference(
    config: FarmDemoConfig,
    run_dir: Path,
    result: FarmResult,
    values: dict[str, Any],
    say: Narrator,
) -> None:
    """The failure-free results, computed in this process (no farm, no workers, no pacing),
    compared with the farm's; both written to results.json."""
    ref_effects = run_dir / "reference"
    ref_effects.mkdir()
    t0 = time.monotonic()
    reference: dict[str, Any] = {}
    for view in result.tasks:
        args: list[Any] = [str(ref_effects), view.seed, 0.0]
        spec = TaskSpec(TARGET, args, task_id=view.task_id)
        reference[view.task_id] = unwrap(
            await TaskRunner(spec, InProcess(spec, MemoryJournal())).run()
        )
        if view.task_id in values:
            view.equal = same(values[view.task_id], reference[view.task_id])
    result.reference_seconds = time.monotonic() - t0
    say(
        f"reference: the {len(reference)} pipelines in-process, no failures, in"
        f" {result.reference_seconds:.1f} s"
    )
    dump = {"farm": values, "reference": reference}
    (run_dir / "results.json").write_text(json.dumps(dump, default=_jsonable, indent=1))


def _jsonable(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value).__name__}")
