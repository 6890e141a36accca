import math

import pytest

from supervise.agents.selection import Holdings, NoVersion, Origin, pairs_of, select
from supervise.snapshot.retention import VersionInfo
from supervise.telemetry import Source

# Three nodes, one rank each; group placement m=2 would pair (0,1) and (2 with ring inside).
OWNER = {0: 0, 1: 1, 2: 2}


def h(rank: int, step: int, loss: float = 1.0, gen: int = 0) -> tuple[int, VersionInfo]:
    info = VersionInfo(step=step, generation=gen, wall_time=0.0, nbytes=100, metrics={"loss": loss})
    return rank, info


def test_latest_is_newest_version_complete_everywhere() -> None:
    holdings = {
        0: Holdings.of(0, ram=(h(0, 10), h(0, 20), h(1, 10), h(1, 20))),
        1: Holdings.of(1, ram=(h(1, 10), h(1, 20), h(0, 10), h(0, 20))),
        2: Holdings.of(2, ram=(h(2, 10),)),  # rank 2 never committed 20
    }
    sel = select(holdings, world_size=3, owner=OWNER)
    assert sel.step == 10
    assert all(o.source is Source.LOCAL for o in sel.origins.values())
    assert sel.nbytes == 300


def test_replacement_node_fetches_from_peer_then_disk() -> None:
    holdings = {
        0: Holdings.of(0, ram=(h(0, 30), h(1, 30))),
        1: Holdings.of(1, ram=()),  # replacement: empty RAM
        2: Holdings.of(2, ram=(h(2, 20),), disk=(h(2, 30),)),
    }
    sel = select(holdings, world_size=3, owner=OWNER)
    assert sel.step == 30
    assert sel.origins[0] == Origin(Source.LOCAL, 0)
    assert sel.origins[1] == Origin(Source.PEER, 0)
    assert sel.origins[2] == Origin(Source.DISK, 2)
    assert sel.fetches_for(1, [1]) == {1: Origin(Source.PEER, 0)}
    assert sel.fetches_for(0, [0]) == {}


def test_disk_only_counts_for_its_owner() -> None:
    # Node 0 sees rank 2's file, but rank 2's owner (node 2) does not: not complete.
    holdings = {
        0: Holdings.of(0, ram=(h(0, 5),), disk=(h(2, 5),)),
        1: Holdings.of(1, ram=(h(1, 5),)),
        2: Holdings.of(2),
    }
    with pytest.raises(NoVersion, match="lacks rank 2"):
        select(holdings, world_size=3, owner=OWNER)


def test_non_finite_metrics_are_never_selected() -> None:
    holdings = {
        n: Holdings.of(n, ram=(h(n, 10), h(n, 20, loss=math.nan if n == 1 else 0.5)))
        for n in range(3)
    }
    assert select(holdings, world_size=3, owner=OWNER).step == 10
    with pytest.raises(NoVersion, match="non-finite"):
        select(holdings, world_size=3, owner=OWNER, checkpoint="specific", version=20)


def test_best_uses_the_mean_metric_and_mode() -> None:
    losses = {10: 0.9, 20: 0.3, 30: 0.5}
    holdings = {
        n: Holdings.of(n, ram=tuple(h(n, s, loss=v + n * 0.01) for s, v in losses.items()))
        for n in range(3)
    }
    assert select(holdings, world_size=3, owner=OWNER, checkpoint="best").step == 20
    assert (
        select(holdings, world_size=3, owner=OWNER, checkpoint="best", best_mode="max").step == 10
    )
    with pytest.raises(NoVersion, match="accuracy"):
        select(holdings, world_size=3, owner=OWNER, checkpoint="best", best_metric="accuracy")


def test_specific_version_explains_what_is_missing() -> None:
    holdings = {0: Holdings.of(0, ram=(h(0, 10), h(0, 20))), 1: Holdings.of(1, ram=(h(1, 10),))}
    owner = {0: 0, 1: 1}
    assert select(holdings, world_size=2, owner=owner, checkpoint="specific", version=10).step == 10
    with pytest.raises(NoVersion, match="version 20 is incomplete: rank 1"):
        select(holdings, world_size=2, owner=owner, checkpoint="specific", version=20)
    with pytest.raises(NoVersion, match="held nowhere"):
        select(holdings, world_size=2, owner=owner, checkpoint="specific", version=99)


def test_nothing_held() -> None:
    with pytest.raises(NoVersion, match="no snapshot is held anywhere"):
        select({0: Holdings.of(0)}, world_size=1, owner={0: 0})


def test_peer_choice_is_deterministic_lowest_node() -> None:
    holdings = {
        0: Holdings.of(0),
        1: Holdings.of(1, ram=(h(0, 7),)),
        2: Holdings.of(2, ram=(h(0, 7),)),
    }
    sel = select(holdings, world_size=1, owner={0: 0})
    assert sel.origins[0] == Origin(Source.PEER, 1)


def test_rewinds_hide_the_abandoned_future() -> None:
    # Generation 1 captured steps 10 and 20 everywhere; generation 2 restarted at 10 (a manual
    # rewind), so 20 of generation 1 is an abandoned future even though it is complete.
    holdings = {
        n: Holdings.of(n, ram=(h(n, 10, gen=1), h(n, 20, gen=1)), disk=(h(n, 20, gen=1),))
        for n in range(3)
    }
    assert select(holdings, world_size=3, owner=OWNER).step == 20
    assert select(holdings, world_size=3, owner=OWNER, rewinds=[(2, 10)]).step == 10
    # What generation 2 captured afterwards counts again.
    newer = {n: Holdings.of(n, ram=(*pairs_of(holdings[n].ram), h(n, 20, gen=2))) for n in range(3)}
    sel = select(newer, world_size=3, owner=OWNER, rewinds=[(2, 10)])
    assert sel.step == 20
