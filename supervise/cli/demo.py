"""`supervise demo`: the embedded showcase (a few node agents on localhost, faults injected)."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``demo`` command."""
    demo = commands.add_parser(
        "demo",
        help="watch supervise survive a crash, a hang, a node loss and a NaN (one machine)",
        description="Start node agents on 127.0.0.1 training a small MLP with torch.distributed "
        "(gloo, CPU); inject a worker crash (kill -9), a hang (SIGSTOP), a node loss (kill -9 of "
        "an agent and its worker, then a replacement agent) and a NaN loss, waiting for training "
        "to resume after each; print the recovery timeline from the agents' OpenTelemetry spans, "
        "write it as an HTML picture, and check that the final parameters equal a failure-free "
        "run bit for bit. OTEL_* variables, when set, also receive the traces. SIGINT or SIGTERM "
        "stops every agent and worker and reports what happened so far. Exit status: 0 "
        "everything held, 1 a check failed, 2 bad usage, 130 interrupted.",
    )
    demo.add_argument(
        "--tasks",
        action="store_true",
        help="the task farm instead: 3 farm nodes run resumable five-step pipelines through a"
        " node loss (kill -9 mid-step); every result checked against a failure-free run, no"
        " finished step run twice",
    )
    demo.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="where logs, the policy, parameters and timeline.html go (default ./supervise-demo,"
        " ./supervise-demo-tasks with --tasks; a previous demo's directory is replaced)",
    )
    demo.add_argument(
        "--nodes", type=int, default=None, metavar="N", help="node agents (2-8, default 3)"
    )
    demo.add_argument(
        "--count",
        type=int,
        default=None,
        metavar="N",
        help="with --tasks: pipelines to run (default 5; at most 2 per node left after the loss)",
    )
    demo.add_argument(
        "--steps", type=int, default=None, metavar="N", help="training steps (default 600)"
    )
    demo.add_argument(
        "--step-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="pause per step, so faults land mid-training (default 0.05); with --tasks: seconds"
        " per pipeline step (default 0.5)",
    )
    demo.add_argument(
        "--faults",
        default=None,
        metavar="LIST",
        help="comma-separated, in order (default crash,hang,node_loss,nan); '' for none",
    )
    demo.add_argument("--policy", metavar="FILE", help="policy TOML (default: policies/demo.toml)")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="2 nodes, 400 faster steps, the reference run alongside: every fault in about"
        " half the time (the test suite's run)",
    )
    demo.set_defaults(handler=_run)


def _fail(message: str) -> int:
    print(f"supervise demo: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    if args.tasks:
        return _run_tasks(args)
    if args.count is not None:
        return _fail("--count applies to --tasks only")
    args.out = "supervise-demo" if args.out is None else args.out
    import trio

    from supervise._demo.cluster import DemoFailure
    from supervise._demo.config import DemoConfig
    from supervise._demo.picture import write_html
    from supervise._demo.report import render
    from supervise._demo.scenario import run_demo
    from supervise._validation import InvalidValue
    from supervise.policy import Policy, PolicyError
    from supervise.telemetry.config import TelemetryConfig, TelemetryError
    from supervise.telemetry.logs import configure_logging

    try:
        base = DemoConfig.quick(args.out) if args.quick else DemoConfig(out_dir=args.out)
        overrides: dict[str, Any] = {
            "nodes": args.nodes,
            "steps": args.steps,
            "step_delay": args.step_delay,
            "faults": args.faults,
            "policy": args.policy,
        }
        fields = {k: v for k, v in overrides.items() if v is not None}
        config = DemoConfig(**{**_fields(base), **fields})
    except InvalidValue as exc:
        return _fail(f"--{exc.field.replace('_', '-')} {exc.value!r}: {exc.allowed}")
    if config.policy is not None:
        try:
            Policy.from_toml(config.policy)
        except PolicyError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    try:
        user_telemetry = TelemetryConfig.from_env()
    except TelemetryError as exc:
        return _fail(str(exc))
    from supervise._demo.scenario import prepare_run_dir

    try:
        run_dir = prepare_run_dir(config.out_dir)
    except DemoFailure as exc:
        return _fail(str(exc))
    with open(run_dir / "demo.log", "w", encoding="utf-8") as log:
        configure_logging(json=True, stream=log)  # the runtime's own lines: not on the terminal
        result = trio.run(
            functools.partial(
                run_demo, config, sys.stdout, run_dir=run_dir, user_telemetry=user_telemetry
            )
        )
        result.timeline_path = run_dir / "timeline.html"
        write_html(result, result.timeline_path)
    sys.stdout.write(render(result))
    if result.interrupted is not None:
        return 130
    return 0 if result.ok else 1


def _run_tasks(args: argparse.Namespace) -> int:
    """`supervise demo --tasks`: the farm demo (see `supervise._demo.farm`)."""
    import trio

    from supervise._demo.cluster import DemoFailure
    from supervise._demo.farm.config import FarmDemoConfig
    from supervise._demo.farm.picture import write_html
    from supervise._demo.farm.report import render
    from supervise._demo.farm.scenario import run_farm_demo
    from supervise._demo.scenario import prepare_run_dir
    from supervise._validation import InvalidValue
    from supervise.policy import Policy, PolicyError
    from supervise.telemetry.logs import configure_logging

    for flag, value in (("--steps", args.steps), ("--faults", args.faults)):
        if value is not None:
            return _fail(f"{flag} applies to the training demo, not to --tasks")
    out = "supervise-demo-tasks" if args.out is None else args.out
    try:
        base = FarmDemoConfig.quick(out) if args.quick else FarmDemoConfig(out_dir=out)
        overrides: dict[str, Any] = {
            "nodes": args.nodes,
            "tasks": args.count,
            "step_delay": args.step_delay,
            "policy": args.policy,
        }
        fields = {k: v for k, v in overrides.items() if v is not None}
        config = FarmDemoConfig(**{**_fields(base), **fields})
    except InvalidValue as exc:
        flag = {"tasks": "count"}.get(exc.field, exc.field)
        return _fail(f"--{flag.replace('_', '-')} {exc.value!r}: {exc.allowed}")
    if config.policy is not None:
        try:
            Policy.from_toml(config.policy)
        except PolicyError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    try:
        run_dir = prepare_run_dir(config.out_dir)
    except DemoFailure as exc:
        return _fail(str(exc))
    with open(run_dir / "demo.log", "w", encoding="utf-8") as log:
        configure_logging(json=True, stream=log)
        result = trio.run(functools.partial(run_farm_demo, config, sys.stdout, run_dir=run_dir))
        result.timeline_path = run_dir / "timeline.html"
        write_html(result, result.timeline_path)
    sys.stdout.write(render(result))
    if result.interrupted is not None:
        return 130
    return 0 if result.ok else 1


def _fields(config: Any) -> dict[str, Any]:
    import attrs

    return {a.name: getattr(config, a.name) for a in attrs.fields(type(config))}
