"""A hot standby agent (``supervise node --standby H:P``): warm spare workers, empty RAM, no
rank. It greets every node each heartbeat interval (as a client); once the coordinator gives
it a lost node's rank it runs that node's agent in this process, its spares still warm.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import structlog
import trio

from supervise.agents import messages as m
from supervise.agents.config import NodeConfig
from supervise.agents.node import _stop_signals, run_node
from supervise.agents.rundir import claim_run_dir
from supervise.agents.workers import SparePool
from supervise.cluster import CurveKeys, Transport
from supervise.cluster.errors import CurveKeyError
from supervise.cluster.keys import node_key_name
from supervise.cluster.transport import normalize_endpoint

__all__ = ["StandbyConfig", "run_standby", "standby_keys"]

log = structlog.get_logger("supervise.agents.standby")

#: The CURVE key a standby greets the nodes with, before it has a node's key.
STANDBY_KEY = "standby"
#: Seconds between two greetings of the coordinator (the others: each heartbeat interval):
#: a lost node's rank is handed out at the first greeting after its loss.
_FAST_HELLO = 0.05


@attrs.frozen(slots=True)
class StandbyConfig:
    """A standby: its own endpoint, and the node config it runs once given a rank
    (``template``: rank and nodes are replaced then)."""

    endpoint: str
    nodes: tuple[str, ...]
    template: NodeConfig

    def take(self, rank: int, nodes: list[str], run_dir: Path) -> NodeConfig:
        """The config of node ``rank`` served here: the cluster's endpoints as the
        coordinator knows them, this standby's in place of the lost node's."""
        where = list(nodes) if len(nodes) == len(self.nodes) else list(self.nodes)
        where[rank] = self.endpoint
        return attrs.evolve(self.template, rank=rank, nodes=where, run_dir=str(run_dir))


def standby_keys(directory: str) -> tuple[CurveKeys, dict[int, CurveKeys]]:
    """CURVE: the key a standby greets with (``standby``, else ``client``) and the node keys
    it holds, by rank (it can take those ranks only)."""
    try:
        hello = CurveKeys.load(directory, STANDBY_KEY)
    except CurveKeyError:
        hello = CurveKeys.load(directory, "client")
    nodes: dict[int, CurveKeys] = {}
    for path in sorted(Path(directory).glob("node-*.key_secret")):
        rank = path.name.removeprefix("node-").removesuffix(".key_secret")
        if rank.isdigit() and path.name == f"{node_key_name(int(rank))}.key_secret":
            nodes[int(rank)] = CurveKeys.for_node(directory, int(rank))
    return hello, nodes


async def run_standby(
    config: StandbyConfig,
    *,
    hello_key: CurveKeys | None = None,
    node_keys: Mapping[int, CurveKeys] | None = None,
    on_rank: Callable[[int], None] | None = None,
) -> int:
    """Wait as a standby, then run the node whose rank it was given (``on_rank(rank)`` first:
    telemetry set up for that rank); returns the process exit code (128 + N: stopped by
    signal N while waiting; 0: the nodes stopped answering, the job is over)."""
    policy = config.template.policy
    run_dir = claim_run_dir(len(config.nodes))
    since = time.time()
    try:
        async with trio.open_nursery() as nursery:
            spares = SparePool(
                config.template.command,
                policy.recovery.preload,
                run_dir,
                env=config.template.env,
                cwd=config.template.cwd,
                shutdown=config.template.worker_shutdown,
                fork_server=policy.recovery.fork_server,
            )
            nursery.start_soon(spares.fill, nursery, config.template.nproc_per_node)
            ranks = None if node_keys is None else sorted(node_keys)
            taken = await _wait_for_rank(config, since, hello_key, ranks)
            if isinstance(taken, int):
                nursery.cancel_scope.cancel()
                return taken
            rank, nodes = taken
            node = config.take(rank, nodes, run_dir)
            if on_rank is not None:
                on_rank(rank)
            log.warning("standby takes over", node=rank, endpoint=node.endpoint)
            curve = None if node_keys is None else node_keys[rank]
            code = await run_node(node, curve=curve, spares=spares)
            nursery.cancel_scope.cancel()
            return code
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


async def _serve(
    transport: Transport, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with transport.running():
        task_status.started()
        await trio.sleep_forever()


async def _wait_for_rank(
    config: StandbyConfig, since: float, curve: CurveKeys | None, ranks: list[int] | None
) -> tuple[int, list[str]] | int:
    """Greet every node each heartbeat interval until one gives this standby a rank; returns
    (rank, every node's endpoint), 128 + N when signal N came first, 0 when the nodes stopped
    answering (the job ended without needing it)."""
    interval = config.template.policy.cluster.heartbeat_interval
    peers = dict(enumerate(config.nodes))
    hello = m.StandbyHello(normalize_endpoint(config.endpoint), config.endpoint, since, ranks)
    transport = Transport(rank=None, peers=peers, curve=curve, kinds=m.ALL_KINDS)
    found: list[tuple[int, list[str]]] = []
    ended: list[int] = []  # the exit code when it ends without a rank
    lead = [-1]  # the coordinator, as the nodes last said
    lead_down = [False]  # it did not answer its last greeting
    quiet_limit = config.template.policy.cluster.rejoin_timeout
    answered = [trio.current_time(), False]  # when a node last answered; whether one ever did
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            """Once the nodes answered, no answer for ``cluster.rejoin_timeout``: the job
            is over (or gone): nothing left to stand by for."""
            while True:
                await trio.sleep(interval)
                if answered[1] and trio.current_time() - float(answered[0]) > quiet_limit:
                    log.info("no node answers any more: the standby exits", quiet=quiet_limit)
                    ended.append(0)
                    nursery.cancel_scope.cancel()
                    return

        async def signals() -> None:
            with trio.open_signal_receiver(*_stop_signals()) as received:
                async for signum in received:
                    log.warning("standby stopping on signal", signal=signal.Signals(signum).name)
                    ended.append(128 + signum)
                    nursery.cancel_scope.cancel()
                    return

        async def greet(node: int) -> None:
            """Say hello to ``node`` each interval, to the coordinator every `_FAST_HELLO`
            (it alone hands out ranks); a node that does not answer: next time."""
            while True:
                try:
                    reply = await transport.request(
                        node, hello, timeout=max(interval, 0.5), expect=m.StandbyOrder
                    )
                except Exception as exc:
                    log.debug("no answer to a standby hello", node=node, error=str(exc))
                    if node == lead[0]:
                        lead_down[0] = True  # its successor hands out ranks: greet all often
                else:
                    answered[:] = [trio.current_time(), True]
                    if node == lead[0]:
                        lead_down[0] = False
                    if reply.body.coordinator >= 0 and reply.body.coordinator != lead[0]:
                        lead[0] = reply.body.coordinator
                        lead_down[0] = False
                    if reply.body.rank >= 0 and not found and not ended:
                        found.append((reply.body.rank, list(reply.body.nodes)))
                        nursery.cancel_scope.cancel()
                        return
                fast = node == lead[0] or lead_down[0]
                await trio.sleep(min(interval, _FAST_HELLO) if fast else interval)

        nursery.start_soon(signals)
        nursery.start_soon(watch)
        await nursery.start(_serve, transport)
        log.info("standby waiting", endpoint=config.endpoint, nodes=len(config.nodes))
        for node in peers:
            nursery.start_soon(greet, node)
    if ended or not found:
        return ended[0] if ended else 1
    return found[0]
