"""`supervise status` and `supervise recover`: talk to running node agents as a client."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from supervise.agents.messages import Status

__all__ = ["register"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nodes", required=True, metavar="H:P,H:P,...", help="the node agents' host:port list"
    )
    p.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="CURVE key directory (when the cluster runs with replication.curve = true)",
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per-node answer timeout"
    )


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``status`` and ``recover`` commands."""
    status = commands.add_parser(
        "status",
        help="show every node: state, generation, coordinator, snapshot versions held where",
        description="Ask every node agent for its state and the snapshot versions it holds (its "
        "own ranks in RAM, its peers' replicas, and on disk). Exit status 0 when every node "
        "answered, 1 when some did not, 2 on bad usage.",
    )
    _common(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=_status)
    recover = commands.add_parser(
        "recover",
        help="restart training on every node now, at a given snapshot version",
        description="Ask the cluster's coordinator for a recovery now: every node's workers are "
        "stopped and restarted, restored to --version (or, with --latest, to what the policy's "
        "checkpoint rule selects). Versions newer than the chosen one are abandoned.",
    )
    _common(recover)
    which = recover.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int, metavar="V", help="the version (step) to restore")
    which.add_argument("--latest", action="store_true", help="what the policy selects")
    recover.set_defaults(handler=_recover)


def _endpoints(text: str) -> dict[int, str] | str:
    from supervise.cluster.transport import normalize_endpoint

    nodes = [n.strip() for n in text.split(",") if n.strip()]
    if not nodes:
        return "--nodes: give at least one host:port"
    for n in nodes:
        try:
            normalize_endpoint(n)
        except ValueError:
            return f"--nodes: {n!r} is not host:port"
    return dict(enumerate(nodes))


async def _ask(
    peers: dict[int, str],
    keys: str | None,
    wait: float,
    message: object,
    only: Sequence[int],
) -> dict[int, Any]:
    """Send ``message`` to each node in ``only``; its reply body, or the exception."""
    import trio

    from supervise.agents import messages as m
    from supervise.cluster import CurveKeys, Transport

    curve = CurveKeys.load(keys, "client") if keys else None
    transport = Transport(rank=None, peers=peers, curve=curve, kinds=m.ALL_KINDS)
    answers: dict[int, Any] = {}
    async with transport.running():

        async def one(node: int) -> None:
            try:
                answers[node] = (await transport.request(node, message, timeout=wait)).body
            except Exception as exc:
                answers[node] = exc

        async with trio.open_nursery() as nursery:
            for node in only:
                nursery.start_soon(one, node)
    return answers


def _fail(cmd: str, message: str) -> int:
    print(f"supervise {cmd}: {message}", file=sys.stderr)
    return 2


def _status(args: argparse.Namespace) -> int:
    import trio

    from supervise.agents import messages as m

    peers = _endpoints(args.nodes)
    if isinstance(peers, str):
        return _fail("status", peers)
    answers = trio.run(_ask, peers, args.curve_keys, args.timeout, m.StatusQuery(), list(peers))
    if args.json:
        print(json.dumps({str(n): _as_json(a) for n, a in sorted(answers.items())}, indent=2))
    else:
        print(_table(answers))
    return 0 if all(not isinstance(a, Exception) for a in answers.values()) else 1


def _recover(args: argparse.Namespace) -> int:
    import trio

    from supervise.agents import messages as m

    peers = _endpoints(args.nodes)
    if isinstance(peers, str):
        return _fail("recover", peers)
    version = -1 if args.latest else args.version
    if version < -1:
        return _fail("recover", f"--version {version}: must be >= 0")
    request = m.Recover(version)
    for node in peers:  # the first node that answers forwards it to the coordinator
        answer = trio.run(_ask, peers, args.curve_keys, args.timeout, request, [node])[node]
        if isinstance(answer, m.RecoverReply):
            if answer.accepted:
                print(answer.detail)
                return 0
            print(f"supervise recover: {answer.detail}", file=sys.stderr)
            return 1
        print(f"node {node}: unreachable ({_one_line(answer)})", file=sys.stderr)
    return 1


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _as_json(a: Status | Exception) -> Any:
    import attrs

    return {"error": _one_line(a)} if isinstance(a, Exception) else attrs.asdict(a)


def _table(answers: dict[int, Status | Exception]) -> str:
    lines = []
    held: dict[int, dict[int, list[str]]] = {}
    for node, a in sorted(answers.items()):
        if isinstance(a, Exception):
            lines.append(f"node {node}: unreachable ({_one_line(a)})")
            continue
        steps = ", ".join(f"rank {r} at step {s}" for r, s in a.steps) or "no steps yet"
        lines.append(
            f"node {node}: {a.state}, generation {a.generation}, coordinator {a.coordinator}, "
            f"live {a.live}, ranks {a.ranks}; {steps}"
        )
        for rank, step, _gen, _nbytes, _metrics in a.ram:
            where = "local" if rank in a.ranks else "replica"
            held.setdefault(rank, {}).setdefault(step, []).append(f"node {node} RAM ({where})")
        for rank, step, _gen, _nbytes, _metrics in a.disk:
            held.setdefault(rank, {}).setdefault(step, []).append(f"node {node} disk")
    if held:
        lines.append("versions held, per rank:")
        for rank in sorted(held):
            for step in sorted(held[rank], reverse=True):
                lines.append(f"  rank {rank} v{step}: {', '.join(held[rank][step])}")
    return "\n".join(lines)
