"""Which version the cluster restarts at, and where each rank's shard comes from.

Pure functions over what every live node reports holding, so the root's decision is easy to
test and to explain: a version is *complete* when every rank's shard of it is held in some live
node's RAM or on disk, and *usable* when all its metrics are finite (a NaN loss poisons the
state captured with it). `latest` takes the newest usable complete version, `best` the one
with the best mean `retention.best_metric`, `specific` exactly the version asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import attrs

from supervise.snapshot.retention import VersionInfo
from supervise.telemetry import Source

#: Shard versions by rank: what one node holds in one place (RAM or disk).
ByRank = Mapping[int, tuple[VersionInfo, ...]]


def by_rank(pairs: Iterable[tuple[int, VersionInfo]]) -> dict[int, tuple[VersionInfo, ...]]:
    """``(rank, version)`` pairs grouped by rank, in their order."""
    out: dict[int, list[VersionInfo]] = {}
    for rank, info in pairs:
        out.setdefault(rank, []).append(info)
    return {rank: tuple(infos) for rank, infos in out.items()}


def pairs_of(held: ByRank) -> list[tuple[int, VersionInfo]]:
    """The ``(rank, version)`` pairs of ``held``, rank by rank."""
    return [(rank, info) for rank, infos in held.items() for info in infos]


def _finite(info: VersionInfo) -> bool:
    return all(math.isfinite(v) for v in info.metrics.values())


@attrs.frozen(slots=True)
class Holdings:
    """What one node reports: shards in its RAM (its own workers' arenas and the replicas it
    holds for group peers) and shards it can read from the persist tier, by rank."""

    node: int
    ram: ByRank = attrs.field(factory=dict)
    disk: ByRank = attrs.field(factory=dict)

    @classmethod
    def of(
        cls,
        node: int,
        ram: Iterable[tuple[int, VersionInfo]] = (),
        disk: Iterable[tuple[int, VersionInfo]] = (),
    ) -> Holdings:
        """Holdings from ``(rank, version)`` pairs."""
        return cls(node, by_rank(ram), by_rank(disk))

    @property
    def empty(self) -> bool:
        return not any(self.ram.values()) and not any(self.disk.values())


@attrs.frozen(slots=True)
class Origin:
    """Where the owner of a rank gets that rank's shard: its own RAM, a peer's RAM, or disk."""

    source: Source
    node: int  # the node holding it (the owner itself for local and disk)


@attrs.frozen(slots=True)
class Selection:
    """The version to restart at and, per rank, where its shard comes from."""

    step: int
    origins: Mapping[int, Origin]
    nbytes: int

    def fetches_for(self, node: int, ranks: Iterable[int]) -> dict[int, Origin]:
        """The shards ``node`` (owning ``ranks``) must fetch before it can restore."""
        return {r: self.origins[r] for r in ranks if self.origins[r].source is not Source.LOCAL}


class NoVersion(Exception):
    """No version satisfies the request; the message says why in one line."""


def _current(h: Holdings, rewinds: Sequence[tuple[int, int]]) -> Holdings:
    def ok(info: VersionInfo) -> bool:
        return all(info.step <= step for gen, step in rewinds if gen > info.generation)

    def keep(held: ByRank) -> dict[int, tuple[VersionInfo, ...]]:
        return {rank: tuple(v for v in infos if ok(v)) for rank, infos in held.items()}

    return Holdings(h.node, keep(h.ram), keep(h.disk))


_Found = tuple[int, VersionInfo]  # (node holding it, the version)


def _ram_index(holdings: Mapping[int, Holdings]) -> dict[tuple[int, int], list[_Found]]:
    ram: dict[tuple[int, int], list[_Found]] = {}
    for node, h in holdings.items():
        for rank, info in pairs_of(h.ram):
            ram.setdefault((rank, info.step), []).append((node, info))
    return ram


def select(
    holdings: Mapping[int, Holdings],
    *,
    world_size: int,
    owner: Mapping[int, int],
    checkpoint: str = "latest",
    version: int | None = None,
    best_metric: str = "loss",
    best_mode: str = "min",
    rewinds: Sequence[tuple[int, int]] = (),
) -> Selection:
    """Pick the restart version among what the live nodes in ``holdings`` report.

    ``owner`` maps each rank to the node that runs it (and restores it). Disk shards count only
    where the owner itself can read them. ``rewinds`` lists earlier restarts as
    ``(generation, step)``: a shard captured before such a restart, of a later step, belongs
    to the future that restart abandoned and is ignored. Raises `NoVersion` when nothing fits.
    """
    holdings = {n: _current(h, rewinds) for n, h in holdings.items()} if rewinds else holdings
    ram = _ram_index(holdings)
    steps = {step for (_rank, step) in ram} | {
        v.step for x in holdings.values() for infos in x.disk.values() for v in infos
    }
    complete: dict[int, dict[int, Origin]] = {}
    shards: dict[int, list[VersionInfo]] = {}
    missing: dict[int, int] = {}
    for step in steps:
        origins: dict[int, Origin] = {}
        chosen: list[VersionInfo] = []
        for rank in range(world_size):
            found = _origin(rank, step, owner[rank], ram, holdings)
            if found is None:
                missing.setdefault(step, rank)
                break
            origins[rank], info = found
            chosen.append(info)
        else:
            complete[step] = origins
            shards[step] = chosen

    usable = {s: o for s, o in complete.items() if all(_finite(v) for v in shards[s])}
    if checkpoint == "specific":
        if version is None:
            raise NoVersion("checkpoint 'specific' needs a version")
        if version in usable:
            return _selection(version, usable, shards)
        if version in complete:
            raise NoVersion(f"version {version} has non-finite metrics")
        if version in missing:
            raise NoVersion(
                f"version {version} is incomplete: rank {missing[version]} has no shard"
            )
        raise NoVersion(f"version {version} is held nowhere")
    if not usable:
        if complete:
            raise NoVersion("every complete version has non-finite metrics")
        if steps:
            newest = max(steps)
            raise NoVersion(
                f"no version is complete for all {world_size} ranks "
                f"(newest, {newest}, lacks rank {missing[newest]})"
            )
        raise NoVersion("no snapshot is held anywhere")
    if checkpoint == "best":
        ranked = [
            (s, _mean_metric(shards[s], best_metric))
            for s in usable
            if _mean_metric(shards[s], best_metric) is not None
        ]
        if not ranked:
            raise NoVersion(f"no complete version carries the metric {best_metric!r}")
        sign = 1.0 if best_mode == "min" else -1.0
        # Best metric first; among equals the newest.
        step = min(ranked, key=lambda sv: (sign * (sv[1] or 0.0), -sv[0]))[0]
        return _selection(step, usable, shards)
    return _selection(max(usable), usable, shards)


def _origin(
    rank: int,
    step: int,
    owner: int,
    ram: Mapping[tuple[int, int], list[_Found]],
    holdings: Mapping[int, Holdings],
) -> tuple[Origin, VersionInfo] | None:
    holders = ram.get((rank, step), [])
    for node, info in holders:
        if node == owner:
            return Origin(Source.LOCAL, owner), info
    if holders:
        # Any live peer will do; the lowest rank keeps the choice deterministic.
        node, info = min(holders, key=lambda nh: nh[0])
        return Origin(Source.PEER, node), info
    if owner in holdings:
        for info in holdings[owner].disk.get(rank, ()):
            if info.step == step:
                return Origin(Source.DISK, owner), info
    return None  # disk shards only other nodes can read do not help the owner


def _mean_metric(shards: list[VersionInfo], name: str) -> float | None:
    values = [v.metrics[name] for v in shards if name in v.metrics]
    return sum(values) / len(values) if values else None


def _selection(
    step: int, usable: Mapping[int, dict[int, Origin]], shards: Mapping[int, list[VersionInfo]]
) -> Selection:
    return Selection(step, usable[step], sum(v.nbytes for v in shards[step]))
