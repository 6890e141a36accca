"""`supervise tasks submit|list|show|result|cancel|pause|resume`: the farm's command line, a
thin layer over the `supervise.tasks.Farm` client.

Everything that can be checked here is checked before anyone is contacted — the target is
imported (from the current directory too) and its arguments bound, each ARG_JSON parsed, the
resources read — and refused in one line, exit 2. Exit 1: the farm refused or could not be
reached, a task failed or was cancelled (``result``); 2 also when no node could ever run it,
or when the flags do not say where the farm is (the client refuses to be built).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervise.tasks.farm import Farm, TaskInfo

__all__ = ["open_farm", "register"]

OK, FAILED, BAD_USAGE = 0, 1, 2


def open_farm(args: argparse.Namespace) -> Farm:
    """The client the flags name (tests replace this function with one giving a fake farm)."""
    from supervise.tasks.farm import Farm

    return Farm(nodes=args.nodes, store=args.store, job=args.job, curve_keys=args.curve_keys)


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", metavar="H:P,H:P,...", help="the farm node agents' host:port list")
    p.add_argument(
        "--store",
        metavar="URL",
        help="the job's coordination store (etcd://HOST:PORT[,...] or etcd+https://, as given "
        "to `supervise node`), when the farm coordinates through one",
    )
    p.add_argument("--job", metavar="NAME", help="the job's keys in --store (default 'default')")
    p.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="CURVE key directory (when the farm runs with replication.curve = true)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def _task_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_id", metavar="ID", help="the task's id (as submit printed it)")


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``tasks`` command and its subcommands."""
    tasks = commands.add_parser(
        "tasks",
        help="submit resumable tasks to a farm of node agents, follow and control them",
        description="Talk to a farm of node agents (`supervise node --tasks`): submit tasks, "
        "list and show them, wait for results, cancel, pause and resume. See docs/tasks.md.",
    )
    tasks.set_defaults(handler=lambda _args: _usage(tasks))
    sub = tasks.add_subparsers(title="subcommands", metavar="SUBCOMMAND")

    submit = sub.add_parser(
        "submit",
        help="queue MODULE:FUNC with JSON arguments; prints its id",
        description="Queue a task: MODULE:FUNC (an async function taking a TaskContext first, "
        "importable on every farm node) called with each ARG_JSON decoded as a positional "
        "argument. The target, its arguments and the resources are checked here first (one "
        'line, exit 2). Prints the task id ({"id": ...} with --json).',
    )
    _where(submit)
    submit.add_argument("target", metavar="MODULE:FUNC")
    submit.add_argument("args", nargs="*", metavar="ARG_JSON", help="a JSON argument")
    submit.add_argument("--cpu", type=float, default=1.0, metavar="N", help="cores (default 1)")
    submit.add_argument(
        "--memory",
        default="0",
        metavar="SIZE",
        help="memory, e.g. 512M (10^6) or 4GiB (2^30) (default 0)",
    )
    submit.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs (default 0)")
    submit.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="K=V",
        help="run only on nodes with this label (repeatable)",
    )
    submit.add_argument(
        "--priority", type=int, default=0, metavar="P", help="higher runs first (default 0)"
    )
    submit.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        metavar="N",
        help="attempts an application error may use (default 3)",
    )
    submit.set_defaults(handler=_submit, command_name="submit")

    listing = sub.add_parser("list", help="every task: id, state, node, attempt, progress, target")
    _where(listing)
    listing.set_defaults(handler=_list, command_name="list")

    show = sub.add_parser("show", help="one task: state, node, attempt, progress, history")
    _where(show)
    _task_id(show)
    show.set_defaults(handler=_show, command_name="show")

    result = sub.add_parser(
        "result",
        help="print a task's return value (--json: as JSON)",
        description="Print a finished task's return value; with --wait, wait for it (up to "
        "--timeout seconds). Exit 0 with the value, 1 when the task failed, was cancelled, is "
        "not finished (without --wait) or the wait timed out.",
    )
    _where(result)
    _task_id(result)
    result.add_argument("--wait", action="store_true", help="wait until the task finishes")
    result.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up waiting after S seconds"
    )
    result.set_defaults(handler=_result, command_name="result")

    for name, helptext in (
        ("cancel", "stop a task for good"),
        ("pause", "checkpoint a task and stop it until resume"),
        ("resume", "let a paused task go on from its checkpoint"),
    ):
        control = sub.add_parser(name, help=helptext)
        _where(control)
        _task_id(control)
        control.set_defaults(handler=_control, command_name=name)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return BAD_USAGE


def _say(args: argparse.Namespace, message: str) -> None:
    print(f"supervise tasks {args.command_name}: {message}", file=sys.stderr)


# --- checks before anyone is contacted ------------------------------------------------------


@contextmanager
def _cwd_importable() -> Iterator[None]:
    """The current directory on sys.path while the target is imported (as `python -m`)."""
    added = "" not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        yield
    finally:
        if added:
            sys.path.remove("")


def _checked_submit(args: argparse.Namespace) -> dict[str, Any] | str:
    """The submit call's arguments, or a one-line reason they are wrong."""
    from supervise._validation import InvalidValue
    from supervise.tasks.attempt import BadTarget, resolve
    from supervise.tasks.resources import Resources, parse_labels, parse_size
    from supervise.tasks.spec import TaskSpec
    from supervise.tasks.values import UnsupportedValue

    values: list[Any] = []
    for i, text in enumerate(args.args, 1):
        try:
            values.append(json.loads(text))
        except json.JSONDecodeError as exc:
            return f"ARG_JSON {i} {text!r} is not JSON: {exc}"
    try:
        memory = parse_size(args.memory, "--memory")
        needs = Resources(args.cpu, memory, args.gpus)
        labels = parse_labels(args.label)
        if args.max_attempts < 1:
            raise InvalidValue("--max-attempts", args.max_attempts, "must be an integer >= 1")
        TaskSpec(args.target, tuple(values))  # the values travel (no pickle)
        with _cwd_importable():
            resolve(args.target, tuple(values))
    except InvalidValue as exc:
        name = exc.field if exc.field.startswith("--") else f"--{exc.field}"
        return f"{name} = {exc.value!r}: {exc.allowed}"
    except (BadTarget, UnsupportedValue) as exc:
        return str(exc)
    return {
        "args": values,
        "cpu": needs.cpu,
        "memory": needs.memory,
        "gpus": needs.gpus,
        "labels": sorted(labels),
        "priority": args.priority,
        "max_attempts": args.max_attempts,
    }


# --- talking to the farm --------------------------------------------------------------------


def _run(args: argparse.Namespace, call: Callable[[Farm], Awaitable[int]]) -> int:
    """Open the farm, run ``call``, map the farm's refusals to one line and an exit status."""
    import trio

    from supervise._validation import InvalidValue
    from supervise.tasks.attempt import BadTarget
    from supervise.tasks.farm import FarmError, Unschedulable
    from supervise.tasks.runner import TaskFailed
    from supervise.tasks.values import UnsupportedValue

    try:
        client = open_farm(args)  # refuses flags that do not say where the farm is
    except FarmError as exc:
        _say(args, str(exc))
        return BAD_USAGE

    async def main() -> int:
        async with client as farm:
            return await call(farm)

    try:
        return trio.run(main)
    except Unschedulable as exc:
        _say(args, f"unschedulable: {exc}")
        return BAD_USAGE
    except (InvalidValue, BadTarget, UnsupportedValue) as exc:
        _say(args, str(exc))
        return BAD_USAGE
    except (FarmError, TaskFailed) as exc:
        _say(args, str(exc))
        return FAILED
    except TimeoutError:
        _say(args, f"task {args.task_id} did not finish within {args.timeout:g} s")
        return FAILED


def _submit(args: argparse.Namespace) -> int:
    checked = _checked_submit(args)
    if isinstance(checked, str):
        _say(args, checked)
        return BAD_USAGE
    values = checked.pop("args")

    async def call(farm: Farm) -> int:
        ref = await farm.submit(args.target, *values, **checked)
        print(json.dumps({"id": ref.task_id}) if args.json else ref.task_id)
        return OK

    return _run(args, call)


def _fmt_node(node: int | None) -> str:
    return "-" if node is None else str(node)


def _list(args: argparse.Namespace) -> int:

    async def call(farm: Farm) -> int:
        infos = await farm.list()
        if args.json:
            print(json.dumps([i.to_json() for i in infos]))
            return OK
        rows = [("ID", "STATE", "NODE", "ATTEMPT", "PROGRESS", "TARGET")]
        rows += [
            (i.id, i.state.value, _fmt_node(i.node), str(i.attempt), f"{i.progress:.0%}", i.target)
            for i in infos
        ]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
        return OK

    return _run(args, call)


def _describe(info: TaskInfo) -> list[str]:
    lines = [
        f"task {info.id}: {info.state.value}" + (f" ({info.reason})" if info.reason else ""),
        f"  target    {info.target}",
        f"  node      {_fmt_node(info.node)}",
        f"  attempt   {info.attempt}",
        f"  progress  {info.progress:.0%}",
        f"  priority  {info.priority}",
        f"  needs     {info.needs}",
    ]
    if info.error:
        lines.append(f"  error     {info.error}")
    for t in info.history:
        source = "-" if t.source is None else t.source.value
        detail = f" {t.detail}" if t.detail else ""
        lines.append(f"  {source} -> {t.target.value} ({t.reason.value}){detail}")
    return lines


def _show(args: argparse.Namespace) -> int:

    async def call(farm: Farm) -> int:
        info = await farm.show(args.task_id)
        print(json.dumps(info.to_json()) if args.json else "\n".join(_describe(info)))
        return OK

    return _run(args, call)


def _control(args: argparse.Namespace) -> int:

    async def call(farm: Farm) -> int:
        actions = {"cancel": farm.cancel, "pause": farm.pause, "resume": farm.resume}
        info = await actions[args.command_name](args.task_id)
        print(json.dumps(info.to_json()) if args.json else f"task {info.id}: {info.state.value}")
        return OK

    return _run(args, call)


def jsonable(value: Any) -> Any:
    """A task value as JSON can hold it: tuples as lists, numpy arrays and scalars as their
    lists and numbers, bytes as base64 text, int keys as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars (no numpy import)
    if callable(tolist) and type(value).__module__ == "numpy":
        return jsonable(tolist())
    return value


def _result(args: argparse.Namespace) -> int:
    if args.timeout is not None and args.timeout <= 0:
        _say(args, f"--timeout = {args.timeout!r}: must be a number of seconds > 0")
        return BAD_USAGE

    async def call(farm: Farm) -> int:
        value = await farm.result(args.task_id, wait=args.wait, timeout=args.timeout)
        text = json.dumps(jsonable(value), indent=None if args.json else 2)
        print(text)
        return OK

    return _run(args, call)
