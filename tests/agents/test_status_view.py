"""`supervise status`'s per-rank view, computed from what each node reports holding: the
newest replica a group peer holds and how far it trails the owner's newest version."""

from __future__ import annotations

from supervise.agents import messages as m
from supervise.cli.status import _table, no_answer_hint, rank_views


def entry(rank: int, step: int) -> m.Entry:
    return (rank, step, 1, 100, {})


def status(
    node: int, ram: list[m.Entry], *, step_age: float | None = 0.5, recoverable: int = -1
) -> m.Status:
    worker = m.WorkerStatus(node, 100 + node, True, True, 42, step_age, 10.0)
    return m.Status(
        node,
        "running",
        1,
        0,
        [0, 1],
        [node],
        ram,
        [],
        [worker],
        [200 + node],
        9,
        recoverable=recoverable,
    )


def test_lag_counts_the_owner_steps_and_versions_newer_than_the_newest_replica() -> None:
    views = rank_views(
        [
            status(0, [entry(0, 30), entry(0, 20), entry(0, 10), entry(1, 20)]),
            status(1, [entry(1, 20), entry(0, 10)]),
        ]
    )
    r0, r1 = views
    assert (r0.newest, r0.newest_replica, r0.replica_nodes) == (30, 10, (1,))
    assert (r0.lag_steps, r0.lag_versions) == (20, 2)
    assert (r1.newest, r1.newest_replica, r1.lag_steps, r1.lag_versions) == (20, 20, 0, 0)


def test_no_replica_and_an_owner_that_did_not_answer() -> None:
    (r0, r1) = rank_views([status(0, [entry(0, 30), entry(1, 25)])])  # node 1 is silent
    assert r0.newest_replica is None and r0.lag_steps is None and r0.lag_versions is None
    assert r1.node is None and r1.worker is None and r1.newest is None
    assert r1.newest_replica == 25 and r1.lag_steps is None


def test_a_replica_newer_than_the_owner_is_no_lag() -> None:
    # The owner's RAM was wiped (a replacement node): its peer is ahead, not behind.
    (r0,) = rank_views([status(0, [entry(0, 10)]), status(1, [entry(0, 30)])])[:1]
    assert (r0.lag_steps, r0.lag_versions) == (0, 0)


def test_table_shows_each_rank_worker_step_age_and_lag() -> None:
    text = _table(
        {
            0: status(0, [entry(0, 30), entry(1, 20)], step_age=75.0, recoverable=20),
            1: status(1, [entry(1, 20), entry(0, 20)]),
            2: TimeoutError("no answer"),
        }
    )
    lines = text.splitlines()
    assert "agent pid 9; spares waiting: 200" in lines[0]  # no guard (0): not shown
    assert "ranks [0], recoverable v20;" in lines[0]
    assert "ranks [1], recoverable none yet;" in lines[1]  # no point agreed on yet
    assert lines[2] == "node 2: unreachable (TimeoutError: no answer)"
    assert lines[3].split() == [
        "rank", "node", "worker", "pid", "last", "step", "age", "newest", "replica", "lag",
    ]  # fmt: skip
    assert lines[4].split() == [
        "0", "0", "100", "(spare)", "42", "1m15s", "v30", "v20", "on", "node", "1",
        "10", "steps", "(1", "version)",
    ]  # fmt: skip
    assert lines[5].split()[-1] == "0"  # rank 1: the replica is current
    assert "  rank 0 v20: node 1 RAM (replica)" in lines


def test_no_answer_hints_at_curve_keys_only_when_none_were_given() -> None:
    down = [TimeoutError("no reply"), TimeoutError("no reply")]
    hint = no_answer_hint(down, None)
    assert hint is not None and "--curve-keys DIR" in hint
    assert no_answer_hint(down, "keys") is None  # keys given: the nodes are down indeed
    assert no_answer_hint([TimeoutError("no reply"), status(1, [])], None) is None  # one answered
    assert no_answer_hint([], None) is None
