"""The recoverable point's rounds, sans-IO: the leader names a target ahead of the newest step,
it becomes the point only once every node holds it, and the point never moves back."""

from __future__ import annotations

from supervise.cluster.recovery_point import RecoveryPoint, Report


def rp(node: int = 0, n: int = 2) -> RecoveryPoint:
    return RecoveryPoint(node, range(n), interval=0.2)


def test_the_target_becomes_the_point_only_once_every_node_holds_it() -> None:
    lead = rp()
    lead.lead({0: Report(newest=(1, 10)), 1: Report(newest=(1, 10))}, now=0.0)
    target = lead.target
    assert target is not None and target[0] == 1 and target[1] > 10
    half = {0: Report(None, target, True, False, (1, 20)), 1: Report(None, target, False)}
    lead.lead(half, now=0.2)
    assert lead.point is None and lead.target == target  # node 1 does not hold it yet
    lead.lead({n: Report(None, target, True, False, (1, 30)) for n in (0, 1)}, now=0.4)
    assert lead.point == target and lead.rounds == 1
    assert lead.target is not None and lead.target > target  # the next round
    assert lead.protected == {target, lead.target}


def test_a_node_that_is_not_heard_from_holds_the_round() -> None:
    lead = rp(n=3)
    lead.lead({0: Report(newest=(1, 10))}, now=0.0)
    target = lead.target
    lead.lead({0: Report(None, target, True, False, (1, 99)), 1: None}, now=0.2)
    assert lead.point is None and lead.target == target


def test_a_missed_target_gets_a_new_one_further_ahead() -> None:
    lead = rp()
    newest = {0: Report(newest=(1, 100)), 1: Report(newest=(1, 100))}
    lead.lead(newest, now=0.0)
    lead.lead({0: Report(newest=(1, 200)), 1: Report(newest=(1, 200))}, now=1.0)  # 100 step/s
    first = lead.target
    assert first is not None
    missed = {0: Report(None, first, False, True, (1, 300)), 1: Report(newest=(1, 300))}
    lead.lead(missed, now=2.0)
    second = lead.target
    assert second is not None and second[1] - 300 > first[1] - 200  # a longer lead
    assert lead.point is None


def test_a_stalled_round_is_replaced_once_training_passed_its_target() -> None:
    lead = RecoveryPoint(0, range(2), interval=0.2, round_timeout=1.0)
    lead.lead({0: Report(newest=(1, 10)), 1: Report(newest=(1, 10))}, now=0.0)
    target = lead.target
    assert target is not None
    stuck = {0: Report(None, target, True, False, (1, target[1] + 5)), 1: Report(None, target)}
    lead.lead(stuck, now=100.0)  # passed the target now; the timeout starts here
    assert lead.target == target
    lead.lead(stuck, now=101.5)
    assert lead.target != target and lead.point is None


def test_a_new_generation_starts_a_new_round_and_keeps_the_old_point() -> None:
    lead = rp()
    lead.point, lead.target = (1, 50), (1, 60)
    lead.lead({0: Report((1, 50), (1, 60), newest=(2, 40)), 1: Report(newest=(2, 40))}, now=0.0)
    assert lead.point == (1, 50)
    assert lead.target is not None and lead.target[0] == 2


def test_a_new_leader_carries_on_from_the_newest_point_any_node_adopted() -> None:
    lead = rp()
    lead.lead({0: Report(newest=(1, 10)), 1: Report((1, 40), (1, 50), newest=(1, 45))}, now=0.0)
    assert lead.point == (1, 40)


def test_followers_adopt_the_leaders_target_and_never_an_older_point() -> None:
    f = rp(node=1)
    f.follow(Report((1, 40), (1, 50)))
    assert (f.point, f.target) == ((1, 40), (1, 50))
    f.follow(Report((1, 50), (1, 60)))
    assert (f.point, f.target) == ((1, 50), (1, 60))
    # a node that just took over knows no target, or an older point: not followed (the
    # target it would drop may be the version a recovery is restoring)
    f.follow(Report(None, None))
    f.follow(Report((1, 40), (1, 70)))
    f.follow(Report(None, (1, 80)))
    assert (f.point, f.target) == ((1, 50), (1, 60))


def test_reports_travel_as_plain_lists_and_bad_ones_are_ignored() -> None:
    r = Report((1, 40), (1, 50), True, False, (1, 45))
    assert Report.from_wire(r.to_wire()) == r
    assert Report.from_wire(Report().to_wire()) == Report()
    assert Report.from_wire(None) is None
    assert Report.from_wire([1, 2]) is None
    assert Report.from_wire([["x", 1], None, True, False, None]) == Report(None, None, True)


def test_targets_fall_on_the_capture_stride() -> None:
    lead = RecoveryPoint(0, range(1), interval=0.2, stride=10)
    lead.lead({0: Report(newest=(1, 33))}, now=0.0)
    assert lead.target is not None and lead.target[1] % 10 == 0 and lead.target[1] > 33


def test_spaced_rounds_name_targets_that_far_ahead_in_training_time() -> None:
    # replication.every_seconds: the targets are what the nodes push, so they come that far
    # apart; the heartbeat lead (two intervals) stays the floor
    def first_lead(spacing: float) -> int:
        lead = RecoveryPoint(0, range(2), interval=0.2, spacing=spacing)
        lead.lead({0: Report(newest=(1, 100)), 1: Report(newest=(1, 100))}, now=0.0)
        first = lead.target
        held = Report(None, first, True, False, (1, 200))
        lead.lead({0: held, 1: held}, now=1.0)  # the round is done; 100 steps/s
        target = lead.target
        assert lead.point == first and target is not None
        return target[1] - 200

    assert first_lead(0.0) == 40  # two heartbeats
    assert first_lead(0.1) == 40
    assert first_lead(3.0) == 300
