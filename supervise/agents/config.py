"""What one node agent is started with: `NodeConfig` (``supervise node`` builds it)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs

from supervise._validation import InvalidValue
from supervise.cluster.transport import MAX_PORT, normalize_endpoint
from supervise.policy import Policy
from supervise.snapshot.persist import check_job, job_fingerprint
from supervise.store import EMBEDDED, StoreConfig, StoreKind, parse_store_url
from supervise.tasks.pool import PoolSettings
from supervise.tasks.resources import Resources


def _nodes(value: Sequence[str]) -> tuple[str, ...]:
    nodes = tuple(value)
    if not nodes:
        raise InvalidValue("nodes", value, "must list at least one host:port")
    for ep in nodes:
        port = ep.rpartition(":")[2] if isinstance(ep, str) else ""
        if port.isdigit() and not 1 <= int(port) <= MAX_PORT:
            raise InvalidValue("nodes", ep, f"port {port} is out of range 1..{MAX_PORT}")
        try:
            address = normalize_endpoint(ep)
        except ValueError:
            raise InvalidValue("nodes", ep, "each entry must be host:port") from None
        if not address.startswith("tcp://") or not address.rpartition(":")[2].isdigit():
            raise InvalidValue("nodes", ep, "each entry must be host:port (TCP, a fixed port)")
    if len(set(nodes)) != len(nodes):
        raise InvalidValue("nodes", ",".join(nodes), "entries must be distinct")
    return nodes


def _command(value: Sequence[str]) -> tuple[str, ...]:
    cmd = tuple(value)
    if not all(isinstance(a, str) and a for a in cmd):
        raise InvalidValue("command", value, "must be a non-empty command, e.g. python train.py")
    return cmd


def _labels(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


@attrs.frozen(slots=True)
class FarmOptions:
    """A farm node (``supervise node --tasks``): what it offers the farm's scheduler."""

    capacity: Resources = attrs.field(validator=attrs.validators.instance_of(Resources))
    labels: frozenset[str] = attrs.field(default=frozenset(), converter=_labels)
    pool: PoolSettings = attrs.field(
        factory=PoolSettings, validator=attrs.validators.instance_of(PoolSettings)
    )  # the warm task workers


@attrs.frozen(slots=True)
class NodeConfig:
    """Everything one node agent is started with (``supervise node`` builds it)."""

    rank: int = attrs.field()
    nodes: tuple[str, ...] = attrs.field(converter=_nodes)
    command: tuple[str, ...] = attrs.field(converter=_command)
    policy: Policy = attrs.field(factory=Policy.default)
    nproc_per_node: int = attrs.field(default=1)
    shm_dir: str = "/dev/shm"
    run_dir: str | None = None
    worker_shutdown: float = 5.0
    env: Mapping[str, str] = attrs.field(factory=dict)
    cwd: str | None = None
    job: str | None = None  # the run's identity on disk (None: a fingerprint, see job_id)
    resume_finished: bool = False  # resume a job whose training finished before
    # where the nodes coordinate: embedded (the lowest live rank, no server) or etcd
    store: StoreConfig = attrs.field(factory=lambda: parse_store_url(EMBEDDED))
    # a farm node (--tasks, no command): runs the farm's tasks instead of training workers
    farm: FarmOptions | None = None

    def __attrs_post_init__(self) -> None:
        if self.farm is None and not self.command:
            raise InvalidValue(
                "command", self.command, "must be a non-empty command, e.g. python train.py"
            )
        if self.farm is not None and self.command:
            raise InvalidValue(
                "command", " ".join(self.command), "a farm node (--tasks) runs no command"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise InvalidValue("rank", self.rank, "must be an integer")
        if not 0 <= self.rank < len(self.nodes):
            raise InvalidValue(
                "rank", self.rank, f"must be in 0..{len(self.nodes) - 1} (one per --nodes entry)"
            )
        if isinstance(self.nproc_per_node, bool) or not isinstance(self.nproc_per_node, int):
            raise InvalidValue("nproc_per_node", self.nproc_per_node, "must be an integer >= 1")
        if self.nproc_per_node < 1:
            raise InvalidValue("nproc_per_node", self.nproc_per_node, "must be an integer >= 1")
        shutdown = self.worker_shutdown
        if (
            isinstance(shutdown, bool)
            or not isinstance(shutdown, int | float)
            or not math.isfinite(shutdown)
            or shutdown < 0
        ):
            raise InvalidValue(
                "worker_shutdown", shutdown, "must be a finite number of seconds >= 0"
            )
        if not isinstance(self.shm_dir, str) or not self.shm_dir:
            raise InvalidValue("shm_dir", self.shm_dir, "must be a directory")
        if self.job is not None:
            try:
                check_job(self.job)
            except ValueError as exc:
                raise InvalidValue("job", self.job, str(exc).split(": ", 1)[-1]) from None

    @property
    def job_id(self) -> str:
        """The job's identity in its persisted files: ``job``, else a fingerprint of the
        command and the world size (the same command restarted is the same job)."""
        return self.job if self.job is not None else job_fingerprint(self.command, self.world_size)

    @property
    def coordinated_by_store(self) -> bool:
        """Whether a consensus store (etcd) elects the coordinator (``--store etcd://...``)."""
        return self.store.kind is not StoreKind.EMBEDDED

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return self.n_nodes * self.nproc_per_node

    def ranks_of(self, node: int) -> range:
        """The global ranks node ``node`` runs."""
        return range(node * self.nproc_per_node, (node + 1) * self.nproc_per_node)

    @property
    def ranks(self) -> range:
        return self.ranks_of(self.rank)

    @property
    def master_addr(self) -> str:
        """Where rank 0's rendezvous runs: the host of node 0."""
        return normalize_endpoint(self.nodes[0]).removeprefix("tcp://").rpartition(":")[0]

    @property
    def hosts_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def endpoint(self) -> str:
        return self.nodes[self.rank]
