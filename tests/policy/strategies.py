"""Hypothesis strategies for valid policies (shared by the policy tests)."""

from __future__ import annotations

import keyword
import string

from hypothesis import strategies as st

import supervise as sv
from supervise.policy import Size

# Durations: finite, non-negative; positive where the field needs it.
positive_seconds = st.floats(min_value=1e-3, max_value=1e7, allow_nan=False)
seconds = st.one_of(st.just(0.0), positive_seconds)

text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30).filter(
    lambda s: s.strip() != ""
)
metric = text.map(str.strip).filter(bool)
identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s)
)
dotted = st.lists(identifier, min_size=1, max_size=3).map(".".join)
import_path = st.one_of(st.just(""), st.builds(lambda m, f: f"{m}:{f}", dotted, dotted))

absolute = st.integers(min_value=0, max_value=1 << 50).map(lambda n: Size(nbytes=n))
relative = st.floats(min_value=0, max_value=100).map(lambda p: Size(percent=p))
sizes = st.one_of(absolute, relative)
nonzero_sizes = sizes.filter(lambda s: s.nbytes != 0 and s.percent != 0)

supervision = st.builds(
    sv.Supervision,
    max_restarts=st.integers(min_value=0, max_value=1000),
    max_seconds=positive_seconds,
)

retention = st.builds(
    sv.Retention,
    keep_last=st.integers(min_value=1, max_value=10),
    keep_best=st.integers(min_value=0, max_value=10),
    best_metric=metric,
    best_mode=st.sampled_from(["min", "max"]),
    memory_budget=nonzero_sizes,
)


@st.composite
def snapshot(draw: st.DrawFn, best_metric: str) -> sv.SnapshotSchedule:
    return sv.SnapshotSchedule(
        every_steps=draw(st.integers(min_value=0, max_value=10**6)),
        every_seconds=draw(seconds),
        on_best=draw(st.sampled_from(["", best_metric])),
        milestones=tuple(
            draw(
                st.lists(
                    st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True),
                    unique=True,
                    max_size=5,
                )
            )
        ),
        staging_budget=draw(sizes),
    )


@st.composite
def replication(draw: st.DrawFn) -> sv.Replication:
    curve = draw(st.booleans())
    keys = draw(text) if curve else ""
    return sv.Replication(
        replicas=draw(st.integers(min_value=1, max_value=16)),
        placement=draw(st.sampled_from(["group", "ring"])),
        every_seconds=draw(st.sampled_from([0.0, 0.25, 2.0, 60.0])),
        curve=curve,
        curve_keys=keys,
    )


persist = st.builds(
    sv.Persist,
    every_snapshots=st.integers(min_value=0, max_value=10**4),
    path=text,
    keep=st.integers(min_value=1, max_value=100),
)


@st.composite
def backoff(draw: st.DrawFn) -> sv.Backoff:
    initial = draw(seconds)
    return sv.Backoff(
        initial=initial,
        max=draw(st.floats(min_value=initial, max_value=max(initial, 1e7))),
        multiplier=draw(st.floats(min_value=1, max_value=100)),
        jitter=draw(st.floats(min_value=0, max_value=1, exclude_max=True)),
        reset_after=draw(st.one_of(st.none(), positive_seconds)),
    )


@st.composite
def recovery(draw: st.DrawFn, keep_best: int) -> sv.Recovery:
    choices = ["latest", "specific"] + (["best"] if keep_best else [])
    checkpoint = draw(st.sampled_from(choices))
    version = draw(st.integers(min_value=1, max_value=10**9)) if checkpoint == "specific" else 0
    return sv.Recovery(
        max_attempts=draw(st.integers(min_value=0, max_value=100)),
        checkpoint=checkpoint,
        version=version,
        restore_optimizer=draw(st.booleans()),
        heartbeat_timeout=draw(positive_seconds),
        startup_timeout=draw(positive_seconds),
        hang_detection=draw(st.sampled_from(["adaptive", "timeout"])),
        hang_phi=draw(st.floats(min_value=0.1, max_value=100)),
        hang_min_steps=draw(st.floats(min_value=1, max_value=1000)),
        hang_min_silence=draw(positive_seconds),
        on_nan=draw(st.sampled_from(["rollback", "ignore", "stop"])),
        on_no_snapshot=draw(st.sampled_from(["stop", "restart"])),
        on_recovery=draw(import_path),
        on_failure=draw(import_path),
        preload=tuple(
            draw(st.lists(st.sampled_from(["torch", "numpy", "torch.distributed"]), unique=True))
        ),
        backoff=draw(backoff()),
    )


@st.composite
def cluster(draw: st.DrawFn) -> sv.Cluster:
    interval = draw(st.floats(min_value=1e-3, max_value=100))
    return sv.Cluster(
        heartbeat_interval=interval,
        peer_timeout=draw(
            st.floats(min_value=interval, max_value=1e4).filter(lambda t: t > interval)
        ),
        rejoin_timeout=draw(st.floats(min_value=1e-3, max_value=1e5)),
    )


@st.composite
def policies(draw: st.DrawFn) -> sv.Policy:
    kept = draw(retention)
    return sv.Policy(
        supervision=draw(supervision),
        snapshot=draw(snapshot(kept.best_metric)),
        retention=kept,
        replication=draw(replication()),
        persist=draw(persist),
        recovery=draw(recovery(kept.keep_best)),
        cluster=draw(cluster()),
    )


__all__ = ["import_path", "policies", "sizes", "string"]
