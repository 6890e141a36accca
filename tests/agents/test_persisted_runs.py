"""Real node agents restarted from the persist tier: a corrupt newest file is set aside and the
cluster resumes from the step before on every rank; a finished job is not resumed unless
asked; another job's files in the same directory are never restored."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from fake_worker import SIZE, advance
from nodekit import FAST_POLICY, nodes

from supervise.snapshot.persist import CORRUPT_SUFFIX

pytestmark = pytest.mark.slow

PERSIST = FAST_POLICY + '[persist]\nevery_snapshots = 1\npath = "ckpt"\nkeep = 4\n'
_FILE = re.compile(r"^step-(\d{12})\.rank-(\d{5})\.safetensors$")


def files(ckpt: Path) -> dict[tuple[int, int], Path]:
    """(rank, step) -> its committed file (in the job's directory, ``ckpt/<job>/``)."""
    out: dict[tuple[int, int], Path] = {}
    for p in ckpt.glob("*/step-*.safetensors"):
        if m := _FILE.match(p.name):
            out[int(m.group(2)), int(m.group(1))] = p
    return out


def on_disk(ckpt: Path) -> dict[int, set[int]]:
    """rank -> the steps of its committed files."""
    out: dict[int, set[int]] = {}
    for rank, step in files(ckpt):
        out.setdefault(rank, set()).add(step)
    return out


def common_steps(ckpt: Path, ranks: int) -> list[int]:
    held = on_disk(ckpt)
    if len(held) < ranks:
        return []
    return sorted(set.intersection(*(held[r] for r in range(ranks))))


def assert_exact(out: Path, ranks: int, steps: int) -> None:
    want = np.zeros(SIZE, dtype=np.float64)
    for step in range(steps):
        advance(want, step)
    for r in range(ranks):
        got = np.frombuffer((out / f"final-rank{r}.npy").read_bytes(), dtype=np.float64)
        assert np.array_equal(got, want), f"rank {r} diverged from a failure-free run"


def damage(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[-100] ^= 0xFF  # in the data region: only loading the file finds it
    else:
        del raw[-4096:]
    path.write_bytes(raw)


def test_cluster_restarted_from_disk_falls_back_past_corrupt_newest_files(
    tmp_path: Path,
) -> None:
    """Rank 1's newest file flipped (found only when loaded) and rank 0's previous one
    truncated: the cluster restarts from the third newest on every rank, bit-exact."""
    ckpt = tmp_path / "ckpt"
    steps = 400  # 8 s of training: still running when every node is killed (at ~step 20)
    with nodes(tmp_path, 2, steps=steps, policy=PERSIST) as c:
        c.start_all()
        c.wait_resumed(1)
        c.wait("four versions on disk for both ranks", lambda: len(common_steps(ckpt, 2)) >= 4)
        for rank in (0, 1):
            c.kill_node(rank)  # every copy in RAM is gone: only the disk is left
        held = common_steps(ckpt, 2)
        newest, previous, third = held[-1], held[-2], held[-3]
        flipped, truncated = files(ckpt)[1, newest], files(ckpt)[0, previous]
        damage(flipped, "flip")
        damage(truncated, "truncate")

        c.start_all()  # the cluster restarted from disk
        assert c.wait_exit(0) == 0 and c.wait_exit(1) == 0
        sent = [e["step"] for e in c.events(0, "restart sent")]
        # The flipped file's header is intact: its version was chosen once, failed to load,
        # and is never chosen again (before the fix: the same version on every attempt).
        assert sent[0] == newest and sent.count(newest) == 1 and sent[-1] == third, sent
        for node in (0, 1):
            loaded = c.events(node, "shard loaded from disk")
            assert any(e["step"] == third for e in loaded), loaded
            resumed = c.events(node, "training resumed")
            assert resumed[-1]["step"] == third, resumed
        for bad, node in ((flipped, 1), (truncated, 0)):
            assert not bad.exists(), bad
            assert bad.with_name(bad.name + CORRUPT_SUFFIX).exists(), bad
            lines = [e["event"] for e in c.events(node) if "renamed to" in str(e.get("event"))]
            assert lines and "fails verification" in lines[0], (node, lines)
        assert_exact(c.out, 2, steps)
        assert c.orphans() == []


def test_finished_job_is_not_resumed_unless_asked_and_another_job_is_not_restored(
    tmp_path: Path,
) -> None:
    ckpt = tmp_path / "ckpt"
    steps = 40
    with nodes(tmp_path, 1, steps=steps, policy=PERSIST) as c:
        first = c.start(0)
        assert c.wait_exit(first) == 0
        [marker] = ckpt.glob("*/finished.rank-00000.json")
        last = max(on_disk(ckpt)[0])

        # The same command again: the job finished, its checkpoints are not resumed.
        again = c.start(0)
        assert c.wait_exit(again) == 2
        text = again.log.read_text()
        assert "already finished" in text and "--resume-finished" in text, text
        assert not c.events(0, "workers started")

        # Asked for: it resumes from its newest persisted step and finishes again.
        c.options = ["--resume-finished"]
        resumed = c.start(0)
        assert c.wait_exit(resumed) == 0
        assert [e["step"] for e in c.events(0, "restart sent")] == [last]
        assert c.events(0, "shard loaded from disk")
        assert marker.exists()
        assert_exact(c.out, 1, steps)

        # Another job in the same directory: one line names the files it does not restore,
        # and it starts from scratch; the finished job's files stay as they were.
        theirs = {p.name: p.read_bytes() for p in marker.parent.glob("step-*")}
        c.options = ["--job", "another-job"]
        other = c.start(0)
        assert c.wait_exit(other) == 0
        assert [e["step"] for e in c.events(0, "restart sent")] == [-1]
        skipped = [e["event"] for e in c.events(0) if "of another job" in str(e.get("event", ""))]
        assert len(skipped) == 1, skipped
        assert "'another-job'" in skipped[0] and f"step-{last:012d}" in skipped[0]
        assert (ckpt / "another-job").is_dir()
        assert theirs
        assert {p.name: p.read_bytes() for p in marker.parent.glob("step-*")} == theirs
        assert_exact(c.out, 1, steps)


def test_bad_job_name_is_a_one_line_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "supervise", "node", "--rank", "0", "--nodes", "127.0.0.1:1",
         "--job", "a/b", "--", "true"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "supervise node: --job 'a/b': use 1-128 letters, digits, '.', '_' or '-', starting with a "
        "letter or digit"
    ]
