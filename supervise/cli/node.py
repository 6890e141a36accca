"""`supervise node --rank R --nodes H:P,... [--policy FILE] [--store URL] -- COMMAND...`: one
node agent."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervise.store import StoreConfig

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``node`` command."""
    node = commands.add_parser(
        "node",
        help="run this node's agent: supervise the training workers, keep their snapshots",
        description="Run one node agent. Start one per node with the same --nodes list; each "
        "starts its training workers (COMMAND, --nproc-per-node of them) once every node is up "
        "and restarts all of them together, restored from RAM, when anything fails. Exit "
        "status: 0 training finished, 3 recovery gave up, 2 bad usage (or a finished job started "
        "again without --resume-finished), 1 internal error, "
        "128+N stopped by signal N.",
    )
    node.add_argument("--rank", type=int, help="this node's index in --nodes")
    node.add_argument(
        "--standby",
        metavar="H:P",
        help="instead of --rank: a hot standby agent listening at H:P (not in --nodes), with "
        "warm spare workers and empty RAM; it takes over the rank of the first node lost",
    )
    node.add_argument(
        "--nodes", required=True, metavar="H:P,H:P,...", help="every node agent's host:port"
    )
    node.add_argument("--policy", metavar="FILE", help="policy TOML (default: the built-in one)")
    node.add_argument(
        "--nproc-per-node", type=int, default=1, metavar="N", help="workers per node (default 1)"
    )
    node.add_argument(
        "--shm-dir",
        default="/dev/shm",
        metavar="DIR",
        help="where snapshot arenas live (default /dev/shm; must be RAM-backed to be fast)",
    )
    node.add_argument(
        "--worker-shutdown",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="grace between SIGTERM and SIGKILL when stopping workers (default 5)",
    )
    node.add_argument(
        "--job",
        metavar="NAME",
        help="this run's identity in its persisted snapshots (default: a fingerprint of the "
        "command and the world size); another job's files are never restored",
    )
    node.add_argument(
        "--resume-finished",
        action="store_true",
        help="resume this job from its persisted snapshots even though its training finished",
    )
    node.add_argument(
        "--store",
        default="embedded",
        metavar="URL",
        help="where the nodes coordinate: 'embedded' (default: the lowest live rank, no "
        "server) or etcd://HOST:PORT[,HOST:PORT...] (an elected coordinator whose decisions "
        "are fenced; etcd+https:// with --store-ca/--store-cert/--store-key); keys live under "
        "/supervise/<--job or 'default'>/",
    )
    node.add_argument("--store-ca", metavar="FILE", help="CA certificate of etcd+https://")
    node.add_argument("--store-cert", metavar="FILE", help="client certificate for etcd")
    node.add_argument("--store-key", metavar="FILE", help="client key for etcd")
    _farm_flags(node)
    node.add_argument("command", nargs=argparse.REMAINDER, help="-- the training command")
    node.set_defaults(handler=_run)


def _farm_flags(node: argparse.ArgumentParser) -> None:
    """``--tasks`` and what a farm node offers (capacity detected, overridable)."""
    farm = node.add_argument_group("farm node (--tasks, no COMMAND)")
    farm.add_argument(
        "--tasks",
        action="store_true",
        help="make this a farm node: run the farm's tasks (supervise tasks submit ...) in "
        "worker processes instead of a training command",
    )
    farm.add_argument("--cpus", type=float, metavar="N", help="cores offered (default: detected)")
    farm.add_argument(
        "--memory", metavar="SIZE", help="memory offered, e.g. 16G (default: detected RAM)"
    )
    farm.add_argument("--gpus", type=int, metavar="N", help="GPUs offered (default: NVML count)")
    farm.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="a label tasks may require (repeatable)",
    )
    farm.add_argument(
        "--task-workers",
        type=int,
        metavar="N",
        help="warm task worker processes kept started, reused attempt after attempt "
        "(default: one per core offered; 0: a fresh process per attempt; GPU tasks always get "
        "a fresh one)",
    )
    farm.add_argument(
        "--task-max-tasks",
        type=int,
        metavar="N",
        help="attempts a warm worker runs before it is replaced (default 1000; 0: no limit)",
    )
    farm.add_argument(
        "--task-preload",
        metavar="MODULES",
        help="modules each warm worker imports once, before its first attempt (comma-separated)",
    )


_POOL_FLAGS = {"task_workers": "workers", "task_max_tasks": "max_tasks", "task_preload": "preload"}


def _farm_options(args: argparse.Namespace) -> Any:
    """The farm node's options from ``--tasks`` and its flags (None: not a farm node);
    InvalidValue names a bad flag."""
    from supervise._validation import InvalidValue
    from supervise.agents.config import FarmOptions
    from supervise.tasks.pool import PoolSettings
    from supervise.tasks.resources import machine_capacity, parse_labels, parse_size

    if not args.tasks:
        for flag in ("cpus", "memory", "gpus", *_POOL_FLAGS):
            if getattr(args, flag, None) is not None:
                raise InvalidValue(flag, getattr(args, flag), "is for farm nodes: add --tasks")
        if args.label:
            raise InvalidValue("label", args.label[0], "is for farm nodes: add --tasks")
        return None
    if args.cpus is not None and not args.cpus > 0:
        raise InvalidValue("cpus", args.cpus, "must be a number of cores > 0")
    if args.gpus is not None and args.gpus < 0:
        raise InvalidValue("gpus", args.gpus, "must be an integer >= 0")
    memory = None if args.memory is None else parse_size(args.memory, "memory")
    capacity = machine_capacity(cpus=args.cpus, memory=memory, gpus=args.gpus)
    pool: dict[str, Any] = {
        key: getattr(args, flag, None)
        for flag, key in _POOL_FLAGS.items()
        if getattr(args, flag, None) is not None
    }
    return FarmOptions(capacity, parse_labels(args.label), PoolSettings(**pool))


def _fail(message: str) -> int:
    print(f"supervise node: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    import trio

    from supervise._validation import InvalidValue
    from supervise.agents.node import NodeConfig, run_node
    from supervise.agents.preflight import StartupError, check_startup
    from supervise.cli._store import store_from_args
    from supervise.cluster import CurveKeys
    from supervise.cluster.errors import CurveKeyError
    from supervise.policy import Policy, PolicyError
    from supervise.snapshot.errors import FinishedJob
    from supervise.snapshot.persist import check_job
    from supervise.store import BadStoreUrl, StoreError
    from supervise.telemetry import (
        TelemetryError,
        configure_logging,
        setup_telemetry,
        shutdown_telemetry,
    )

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        farm = _farm_options(args)
    except InvalidValue as exc:
        return _fail(f"--{exc.field.replace('_', '-')} {exc.value!r}: {exc.allowed}")
    if farm is not None and command:
        return _fail("a farm node (--tasks) runs no command: drop the part after '--'")
    if not command and farm is None:
        return _fail("no training command: put it after '--', e.g. -- python train.py")
    try:
        policy = Policy.from_toml(args.policy) if args.policy else Policy.default()
    except PolicyError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if (args.rank is None) == (args.standby is None):
        return _fail("give either --rank R (a node) or --standby H:P (a hot standby agent)")
    if args.standby is not None and farm is not None:
        return _fail("--standby is for training nodes, not farm nodes (--tasks)")
    # a standby is checked as the node it would be: one more entry, its own endpoint
    rank = len(nodes) if args.standby is not None else args.rank
    entries = [*nodes, args.standby] if args.standby is not None else nodes
    if args.job is not None:
        try:
            check_job(args.job)
        except ValueError as exc:
            return _fail(f"--{exc}")
    try:
        store = store_from_args(args)
    except BadStoreUrl as exc:
        return _fail(f"--{exc}")
    try:
        config = NodeConfig(
            rank=rank,
            nodes=entries,
            command=command,
            policy=policy,
            nproc_per_node=args.nproc_per_node,
            shm_dir=args.shm_dir,
            worker_shutdown=args.worker_shutdown,
            job=args.job,
            resume_finished=args.resume_finished,
            store=store,
            farm=farm,
        )
    except InvalidValue as exc:
        return _fail(f"--{exc.field.replace('_', '-')} {exc.value!r}: {exc.allowed}")
    configure_logging()  # the checks may set a damaged persisted file aside, with a log line
    try:
        check_startup(config)
    except StartupError as exc:
        return _fail(str(exc))
    if config.coordinated_by_store:
        try:
            trio.run(_probe, config.store)
        except StoreError as exc:
            return _fail(f"--store {args.store}: {exc}")
    if args.standby is not None:
        return _run_standby(args.standby, nodes, config)
    curve = None
    if policy.replication.curve:
        try:
            curve = CurveKeys.for_node(policy.replication.curve_keys, config.rank)
        except CurveKeyError as exc:
            return _fail(str(exc))
    try:
        setup_telemetry(rank=config.rank)
    except TelemetryError as exc:
        return _fail(str(exc))
    try:
        return trio.run(functools.partial(run_node, config, curve=curve))
    except (StartupError, FinishedJob) as exc:  # a port taken since the checks; a finished job
        return _fail(str(exc))
    finally:
        shutdown_telemetry()


def _run_standby(endpoint: str, nodes: list[str], template: Any) -> int:
    """``--standby H:P``: wait with warm spares, then run the lost node given to it."""
    import trio

    from supervise.agents.preflight import StartupError
    from supervise.agents.standby import StandbyConfig, run_standby, standby_keys
    from supervise.cluster.errors import CurveKeyError
    from supervise.snapshot.errors import FinishedJob
    from supervise.telemetry import TelemetryError, setup_telemetry, shutdown_telemetry

    policy = template.policy
    hello_key = node_keys = None
    if policy.replication.curve:
        try:
            hello_key, node_keys = standby_keys(policy.replication.curve_keys)
        except CurveKeyError as exc:
            return _fail(str(exc))
        if not node_keys:
            return _fail(
                f"--standby with replication.curve: no node-R.key_secret in "
                f"{policy.replication.curve_keys} (a standby takes a rank with that node's key)"
            )
    config = StandbyConfig(endpoint, tuple(nodes), template)
    try:  # checked now; set up once the standby knows its rank
        setup_telemetry()
    except TelemetryError as exc:
        return _fail(str(exc))
    shutdown_telemetry()

    def took(rank: int) -> None:
        setup_telemetry(rank=rank)

    try:
        run = functools.partial(
            run_standby, config, hello_key=hello_key, node_keys=node_keys, on_rank=took
        )
        return trio.run(run)
    except (StartupError, FinishedJob) as exc:
        return _fail(str(exc))
    finally:
        shutdown_telemetry()


async def _probe(config: StoreConfig) -> None:
    """One read of the job's keys: an unreachable store is a one-line error at start-up."""
    from supervise.store import open_store, probe

    store = open_store(config)
    try:
        await probe(store, config)
    finally:
        await store.aclose()
