"""`supervise status` and `supervise recover`: talk to running node agents as a client."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from supervise.agents.messages import Entry, Status, WorkerStatus
    from supervise.store import StoreConfig

__all__ = ["no_answer_hint", "register"]


def _common(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--nodes", metavar="H:P,H:P,...", help="the node agents' host:port list")
    where.add_argument(
        "--store",
        metavar="URL",
        help="find the node agents in the job's membership keys instead: "
        "etcd://HOST:PORT[,HOST:PORT...] or etcd+https:// (as given to `supervise node`)",
    )
    p.add_argument("--job", metavar="NAME", help="the job's keys in --store (default 'default')")
    p.add_argument("--store-ca", metavar="FILE", help="CA certificate of etcd+https://")
    p.add_argument("--store-cert", metavar="FILE", help="client certificate for etcd")
    p.add_argument("--store-key", metavar="FILE", help="client key for etcd")
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
        help="show every node and rank: state, generation, the recoverable point, worker PIDs, "
        "last step and its age, replica lag, snapshot versions held where",
        description="Ask every node agent for its state, the recoverable point it knows (the "
        "newest step complete across the cluster), its workers (PIDs, spares, each rank's "
        "last step and the seconds since) and the snapshot versions it holds (its own ranks in "
        "RAM, its peers' replicas, and on disk); each rank's replica lag is computed from those "
        "holdings. --json: the layout documented in docs/node.md. Exit status 0 when every node "
        "answered, 1 when some did not, 2 on bad usage.",
    )
    _common(status)
    status.add_argument(
        "--json", action="store_true", help="print JSON (schema: docs/node.md) instead of a table"
    )
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


def _peers(args: argparse.Namespace) -> tuple[dict[int, str], int | None] | str:
    """The node agents to ask (by rank) and the coordinator's rank where the store names one;
    a one-line error otherwise."""
    if args.store is None:
        if args.job or args.store_ca or args.store_cert or args.store_key:
            return "--job and --store-ca/--store-cert/--store-key go with --store"
        peers = _endpoints(args.nodes)
        return peers if isinstance(peers, str) else (peers, None)
    import trio

    from supervise.cli._store import store_from_args
    from supervise.store import BadStoreUrl, StoreError, StoreKind

    try:
        config = store_from_args(args)
    except BadStoreUrl as exc:
        return f"--{exc}"
    if config.kind is StoreKind.EMBEDDED:
        return "--store embedded: that store lives inside the agents; give --nodes"
    try:
        members = trio.run(_members, config)
    except StoreError as exc:
        return f"--store {args.store}: {exc}"
    if isinstance(members, str):
        return f"--store {args.store}: {members}"
    return members


async def _members(config: StoreConfig) -> tuple[dict[int, str], int | None] | str:
    """The live members of ``config``'s job (rank -> endpoint) and the elected coordinator."""
    from supervise.agents.seat import LEADER, MEMBERS
    from supervise.store import open_store

    store = open_store(config)
    try:
        members = await store.range(config.prefix + MEMBERS, prefix=True)
        leader = await store.get(config.prefix + LEADER)
    finally:
        await store.aclose()
    peers: dict[int, str] = {}
    for record in members.records:
        try:
            body = json.loads(record.value)
            peers[int(body["rank"])] = str(body["endpoint"])
        except (ValueError, KeyError, TypeError):
            return f"membership key {record.key} holds no rank and endpoint"
    if not peers:
        return f"no live node agents under {config.prefix} (wrong --job?)"
    try:
        coordinator = None if leader is None else int(leader.value)
    except ValueError:
        coordinator = None
    return dict(sorted(peers.items())), coordinator


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

    found = _peers(args)
    if isinstance(found, str):
        return _fail("status", found)
    peers, _ = found
    answers = trio.run(_ask, peers, args.curve_keys, args.timeout, m.StatusQuery(), list(peers))
    if args.json:
        print(json.dumps(as_json(peers, answers), indent=2))
    else:
        print(_table(answers))
    hint = no_answer_hint(answers.values(), args.curve_keys)
    if hint:
        print(f"supervise status: {hint}", file=sys.stderr)
    return 0 if all(not isinstance(a, Exception) for a in answers.values()) else 1


def _recover(args: argparse.Namespace) -> int:
    import trio

    from supervise.agents import messages as m

    version = -1 if args.latest else args.version
    if version < -1:
        return _fail("recover", f"--version {version}: must be >= 0")
    found = _peers(args)
    if isinstance(found, str):
        return _fail("recover", found)
    peers, coordinator = found
    request = m.Recover(version)
    failures: list[object] = []
    order = sorted(peers, key=lambda node: node != coordinator)  # the elected one first
    for node in order:  # the first node that answers forwards it to the coordinator
        answer = trio.run(_ask, peers, args.curve_keys, args.timeout, request, [node])[node]
        if isinstance(answer, m.RecoverReply):
            if answer.accepted:
                print(answer.detail)
                return 0
            print(f"supervise recover: {answer.detail}", file=sys.stderr)
            return 1
        failures.append(answer)
        print(f"node {node}: unreachable ({_one_line(answer)})", file=sys.stderr)
    hint = no_answer_hint(failures, args.curve_keys)
    if hint:
        print(f"supervise recover: {hint}", file=sys.stderr)
    return 1


def no_answer_hint(answers: Iterable[object], curve_keys: str | None) -> str | None:
    """What to try when no node answered and no keys were given: a cluster that runs with
    CURVE drops a client's plaintext handshake silently, which looks like a node that is down."""
    answers = list(answers)
    if curve_keys or not answers or not all(isinstance(a, Exception) for a in answers):
        return None
    return (
        "no node answered; if the cluster runs with replication.curve = true, "
        "pass --curve-keys DIR (the directory `supervise keys generate` wrote)"
    )


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


#: The version of the ``--json`` document's layout (docs/node.md, "status --json").
SCHEMA = 1
_AGE_DIGITS = 3  # seconds, to the millisecond


def _age(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, _AGE_DIGITS)


@attrs.frozen(slots=True)
class RankView:
    """One rank across the cluster: its worker, its progress, and how far the newest replica
    held by a group peer trails the owner's newest version (from every node's holdings)."""

    rank: int
    node: int | None  # its owner (None: the owner did not answer)
    worker: WorkerStatus | None
    newest: int | None  # the owner's newest version in its RAM
    newest_replica: int | None  # the newest version a peer holds in RAM
    replica_nodes: tuple[int, ...]  # the peers holding newest_replica
    newest_on_disk: int | None  # the newest version in the persist tier
    lag_versions: int | None  # the owner's versions newer than newest_replica

    @property
    def lag_steps(self) -> int | None:
        """How many steps the newest replica is behind the owner's newest (0: caught up)."""
        if self.newest is None or self.newest_replica is None:
            return None
        return max(0, self.newest - self.newest_replica)


def rank_views(statuses: Sequence[Status]) -> list[RankView]:
    """Every rank some answering node runs or holds, with its replica lag."""
    owner = {rank: st.node for st in statuses for rank in st.ranks}
    workers = {w.rank: w for st in statuses for w in st.workers}
    own: dict[int, set[int]] = {}
    replicas: dict[int, dict[int, set[int]]] = {}  # rank -> step -> peers holding it
    disk: dict[int, set[int]] = {}
    for st in statuses:
        for rank, step, *_ in st.ram:
            if owner.get(rank) == st.node:
                own.setdefault(rank, set()).add(step)
            else:
                replicas.setdefault(rank, {}).setdefault(step, set()).add(st.node)
        for rank, step, *_ in st.disk:
            disk.setdefault(rank, set()).add(step)
    views = []
    for rank in sorted({*owner, *own, *replicas, *disk}):
        mine = own.get(rank, set())
        held = replicas.get(rank, {})
        newest = max(mine, default=None)
        newest_replica = max(held, default=None)
        lag = None
        if newest is not None and newest_replica is not None:
            lag = sum(1 for step in mine if step > newest_replica)
        views.append(
            RankView(
                rank=rank,
                node=owner.get(rank),
                worker=workers.get(rank),
                newest=newest,
                newest_replica=newest_replica,
                replica_nodes=tuple(sorted(held.get(newest_replica, ())))
                if newest_replica is not None
                else (),
                newest_on_disk=max(disk.get(rank, ()), default=None),
                lag_versions=lag,
            )
        )
    return views


def _entry_json(entry: Entry, *, ranks: Sequence[int] | None) -> dict[str, Any]:
    rank, step, generation, nbytes, metrics = entry
    out: dict[str, Any] = {
        "rank": rank,
        "step": step,
        "generation": generation,
        "nbytes": nbytes,
        "metrics": dict(metrics),
    }
    if ranks is not None:  # RAM: this node's own rank, or a replica it keeps for a peer
        out["held_as"] = "own" if rank in ranks else "replica"
    return out


def _worker_json(w: WorkerStatus) -> dict[str, Any]:
    return {
        "rank": w.rank,
        "pid": w.pid or None,
        "spare": w.spare,
        "alive": w.alive,
        "last_step": w.last_step,
        "last_step_age_s": _age(w.step_age),
        "running_s": _age(w.running_for),
    }


def _node_json(node: int, endpoint: str, a: Status | Exception) -> dict[str, Any]:
    if isinstance(a, Exception):
        return {
            "node": node,
            "endpoint": endpoint,
            "reachable": False,
            "error": _one_line(a),
            "state": None,
            "generation": None,
            "coordinator": None,
            "live": [],
            "ranks": [],
            "agent_pid": None,
            "guard_pid": None,
            "spare_pids": [],
            "workers": [],
            "ram": [],
            "disk": [],
            "recoverable": None,
        }
    return {
        "node": node,
        "endpoint": endpoint,
        "reachable": True,
        "error": None,
        "state": a.state,
        "generation": a.generation,
        "coordinator": a.coordinator,
        "live": list(a.live),
        "ranks": list(a.ranks),
        "agent_pid": a.pid or None,
        "guard_pid": a.guard or None,
        "spare_pids": list(a.spares),
        "workers": [_worker_json(w) for w in a.workers],
        "ram": [_entry_json(e, ranks=a.ranks) for e in a.ram],
        "disk": [_entry_json(e, ranks=None) for e in a.disk],
        "recoverable": _recoverable(a),
    }


def _recoverable(a: Status) -> int | None:
    """The newest step the node knows complete across the cluster (None: none yet)."""
    return a.recoverable if a.recoverable >= 0 else None


def _rank_json(v: RankView) -> dict[str, Any]:
    w = v.worker
    return {
        "rank": v.rank,
        "node": v.node,
        "pid": (w.pid or None) if w is not None else None,
        "spare": w.spare if w is not None else None,
        "last_step": w.last_step if w is not None else None,
        "last_step_age_s": _age(w.step_age) if w is not None else None,
        "newest": v.newest,
        "newest_replica": v.newest_replica,
        "replica_nodes": list(v.replica_nodes),
        "newest_on_disk": v.newest_on_disk,
        "lag_steps": v.lag_steps,
        "lag_versions": v.lag_versions,
    }


def as_json(peers: dict[int, str], answers: dict[int, Status | Exception]) -> dict[str, Any]:
    """The ``status --json`` document (its layout: docs/node.md, versioned by `SCHEMA`)."""
    statuses = [a for _, a in sorted(answers.items()) if not isinstance(a, Exception)]
    return {
        "schema": SCHEMA,
        "nodes": [_node_json(n, peers[n], a) for n, a in sorted(answers.items())],
        "ranks": [_rank_json(v) for v in rank_views(statuses)],
    }


def _seconds(age: float | None) -> str:
    """An age for people: 0.4s, 12s, 3m05s, 2h10m."""
    if age is None:
        return "-"
    if age < 10:
        return f"{age:.1f}s"
    if age < 60:
        return f"{age:.0f}s"
    if age < 3600:
        return f"{int(age // 60)}m{int(age % 60):02d}s"
    return f"{int(age // 3600)}h{int(age % 3600 // 60):02d}m"


def _worker_cell(w: WorkerStatus | None) -> str:
    if w is None or not w.pid:
        return "-"
    flags = [f for f, on in (("spare", w.spare), ("exited", not w.alive)) if on]
    return f"{w.pid} ({', '.join(flags)})" if flags else str(w.pid)


def _lag_cell(v: RankView) -> str:
    if v.newest_replica is None:
        return "no replica"
    if v.lag_steps is None:
        return "-"
    if v.lag_steps == 0:
        return "0"
    versions = f"{v.lag_versions} version{'s' if v.lag_versions != 1 else ''}"
    return f"{v.lag_steps} steps ({versions})"


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return out


def _table(answers: dict[int, Status | Exception]) -> str:
    lines = []
    held: dict[int, dict[int, list[str]]] = {}
    statuses = []
    for node, a in sorted(answers.items()):
        if isinstance(a, Exception):
            lines.append(f"node {node}: unreachable ({_one_line(a)})")
            continue
        statuses.append(a)
        pids = f"agent pid {a.pid}" + (f", guard pid {a.guard}" if a.guard else "")
        spares = ", ".join(map(str, a.spares)) or "none"
        point = _recoverable(a)
        recoverable = "none yet" if point is None else f"v{point}"
        lines.append(
            f"node {node}: {a.state}, generation {a.generation}, coordinator {a.coordinator}, "
            f"live {a.live}, ranks {a.ranks}, recoverable {recoverable}; {pids}; "
            f"spares waiting: {spares}"
        )
        for rank, step, *_ in a.ram:
            where = "local" if rank in a.ranks else "replica"
            held.setdefault(rank, {}).setdefault(step, []).append(f"node {node} RAM ({where})")
        for rank, step, *_ in a.disk:
            held.setdefault(rank, {}).setdefault(step, []).append(f"node {node} disk")
    views = rank_views(statuses)
    if views:
        rows = [["rank", "node", "worker pid", "last step", "age", "newest", "replica", "lag"]]
        for v in views:
            w = v.worker
            replica = "-"
            if v.newest_replica is not None:
                on = ",".join(map(str, v.replica_nodes))
                replica = f"v{v.newest_replica} on node {on}"
            rows.append(
                [
                    str(v.rank),
                    "-" if v.node is None else str(v.node),
                    _worker_cell(w),
                    "-" if w is None or w.last_step is None else str(w.last_step),
                    _seconds(w.step_age if w is not None else None),
                    "-" if v.newest is None else f"v{v.newest}",
                    replica,
                    _lag_cell(v),
                ]
            )
        lines += _columns(rows)
    if held:
        lines.append("versions held, per rank:")
        for rank in sorted(held):
            for step in sorted(held[rank], reverse=True):
                lines.append(f"  rank {rank} v{step}: {', '.join(held[rank][step])}")
    return "\n".join(lines)
