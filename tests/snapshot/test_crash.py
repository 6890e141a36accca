"""Real processes: crash with os._exit, restore in a fresh process, compare bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from snaphelp import Proc, ThreadedAgent, make_service

from supervise._testing.poll import wait_until
from supervise.snapshot.checksum import mismatches

HERE = Path(__file__).parent
SCRIPT = str(HERE / "train_worker.py")
STEPS = 12
POLICY = {
    "snapshot": {"every_steps": 2},
    "retention": {"keep_last": 1},
    "persist": {"every_snapshots": 0},
}

pytestmark = pytest.mark.slow


def run(out: Path, crash_at: int, opt: str, env: dict[str, str]) -> tuple[int, str]:
    proc = Proc([SCRIPT, str(out), str(STEPS), str(crash_at), opt], env)
    try:
        return proc.wait(timeout=180)
    finally:
        proc.kill()


def assert_equal_runs(a: Path, b: Path) -> None:
    x, y = torch.load(a), torch.load(b)
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]), k
    for pid, st in x["opt"]["state"].items():
        for key, t in st.items():
            assert torch.equal(t, y["opt"]["state"][pid][key]), (pid, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The failure-free run (AdamW), computed once for the tests of this module."""
    out = tmp_path_factory.mktemp("reference") / "final.pt"
    rc, log = run(out, -1, "adamw", {"SUPERVISE_AGENT": "", "SHM_DIR": str(out.parent)})
    assert rc == 0, log
    return out


def test_bit_exact_resume_from_disk_after_a_crash(tmp_path: Path, reference: Path) -> None:
    # The two runs' command lines differ (the crash step): one job named in the environment.
    env = {"SHM_DIR": str(tmp_path), "SUPERVISE_AGENT": "", "SUPERVISE_JOB": "crash-test"}
    rc, log = run(tmp_path / "final.pt", 7, "adamw", env)
    assert rc == 3, log
    # On a loaded machine both slots can still be pinned by the disk writer when a capture is
    # due: the capture is skipped (training never waits for the disk), so the newest committed
    # version is the last one the worker reported as captured.
    last = max(int(line.split()[1]) for line in log.splitlines() if line.startswith("captured"))
    assert last >= 2, log
    rc, log = run(tmp_path / "final.pt", -1, "adamw", env)
    assert rc == 0, log
    assert f"restored {last}" in log  # from the persist tier, in a fresh process
    assert_equal_runs(reference, tmp_path / "final.pt")


def test_bit_exact_resume_from_the_agents_ram(tmp_path: Path, reference: Path) -> None:
    svc = make_service(tmp_path / "shm", keep_last=1)
    svc.policy = POLICY
    agent = ThreadedAgent(svc, f"ipc://{tmp_path}/agent.sock")
    try:
        env = {"SUPERVISE_AGENT": agent.endpoint}
        rc, log = run(tmp_path / "final.pt", 9, "adamw", env)
        assert rc == 3, log
        assert [v.step for v in svc.versions(0)] == [8]
        rc, log = run(tmp_path / "final.pt", -1, "adamw", env)
        assert rc == 0, log
        assert "restored 8" in log
        assert_equal_runs(reference, tmp_path / "final.pt")
    finally:
        agent.close()
        svc.close()


def test_kill_during_capture_keeps_the_committed_version(tmp_path: Path) -> None:
    svc = make_service(tmp_path / "shm", keep_last=1)
    svc.policy = POLICY
    agent = ThreadedAgent(svc, f"ipc://{tmp_path}/agent.sock")
    out = tmp_path / "final.pt"
    proc = Proc(
        [SCRIPT, str(out), str(STEPS), "-1", "sgd"],
        {"SUPERVISE_AGENT": agent.endpoint, "HANG_IN_CAPTURE": "6"},
    )
    try:

        def hung() -> bool:
            assert proc.popen.poll() is None, proc.wait()[1]
            return out.with_suffix(".hang").exists()

        wait_until(hung, what="the worker to hang mid-capture of version 6", timeout_s=120)
        proc.kill()  # SIGKILL by PID, mid-copy of version 6
        assert [v.step for v in svc.versions(0)] == [4]
        with svc.shard(0, 4) as sh:
            assert mismatches(sh.manifest, sh.data) == []
        # a fresh worker restores the committed version exactly
        rc, log = run(out, -1, "sgd", {"SUPERVISE_AGENT": agent.endpoint})
        assert rc == 0 and "restored 4" in log, log
    finally:
        proc.kill()
        agent.close()
        svc.close()
