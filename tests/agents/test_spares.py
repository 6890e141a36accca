"""Spare workers: which commands get one, and a real spare that becomes a generation's worker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from supervise._testing.poll import wait_until_async
from supervise.agents.workers import Launch, SparePool, WorkerGroup, warm_target
from supervise.runtime import ExitKind, ExitReason, OutputLine

SCRIPT = """
import os, sys
print("ran", sys.argv[1:], os.environ["RANK"], os.environ["SUPERVISE_GENERATION"],
      "json" in sys.modules, __name__, flush=True)
sys.exit(int(os.environ.get("CODE", "0")))
"""


@pytest.mark.parametrize(
    ("command", "target"),
    [
        (("python", "train.py", "--lr", "1"), ["train.py", "--lr", "1"]),
        (("/usr/bin/python3.11", "-m", "pkg.train", "x"), ["-m", "pkg.train", "x"]),
        ((sys.executable, "t.py"), ["t.py"]),
        (("python", "-u", "train.py"), None),  # interpreter options: started cold, as given
        (("python", "-m"), None),
        (("python",), None),
        (("torchrun", "train.py"), None),
        (("bash", "-c", "python train.py"), None),
    ],
)
def test_which_commands_get_spares(command: tuple[str, ...], target: list[str] | None) -> None:
    assert warm_target(command) == target


def test_no_preload_or_no_python_means_no_spares(tmp_path: Path) -> None:
    assert not SparePool(("python", "t.py"), (), tmp_path).enabled
    assert not SparePool(("./train.sh",), ("torch",), tmp_path).enabled
    assert SparePool(("python", "t.py"), ("json",), tmp_path).enabled


def launch(script: Path, generation: int) -> Launch:
    return Launch(
        command=(sys.executable, str(script), "a", "b"),
        node_rank=1,
        nproc=2,
        n_nodes=2,
        generation=generation,
        master_addr="127.0.0.1",
        master_port=29500,
        agent="ipc:///nowhere",
        env={"CODE": "3"},
    )


async def test_a_spare_becomes_the_worker_and_exits_like_one(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    lines: list[OutputLine] = []
    exits: list[tuple[int, int, ExitReason]] = []
    spec = launch(script, 4)
    pool = SparePool(
        spec.command, ("json",), tmp_path, env=spec.env, on_output=lines.append, shutdown=2.0
    )
    async with trio.open_nursery() as nursery:
        await pool.fill(nursery, 1)  # one spare for two local workers: one starts cold
        assert pool.ready == 1
        spare_pid = pool._ready[0].pid
        group = WorkerGroup(
            spec,
            on_exit=lambda r, p, why: exits.append((r, p, why)),
            on_output=lines.append,
            spares=pool,
            shutdown=2.0,
        )
        await nursery.start(group.run)
        assert group.warm == {2} and group.pids[2] == spare_pid and group.pids[3] != spare_pid
        assert pool.ready == 0
        with trio.fail_after(60):
            await group.wait()
        nursery.cancel_scope.cancel()  # the template serves until the node stops
    ran = sorted(line.text for line in lines if line.text.startswith("ran"))
    assert ran == [
        "ran ['a', 'b'] 2 4 True __main__",  # the spare: json preloaded, rank 2 of generation 4
        "ran ['a', 'b'] 3 4 False __main__",  # the cold start
    ]
    assert {(r, why.kind, why.exit_code) for r, _, why in exits} == {
        (2, ExitKind.ABNORMAL, 3),
        (3, ExitKind.ABNORMAL, 3),
    }
    assert list(tmp_path.glob("*.go")) == []


async def test_a_restart_while_the_template_imports_waits_for_its_spare_not_a_cold_start(
    tmp_path: Path,
) -> None:
    # a replacement node's first restart comes while its template still imports: a worker
    # started cold would import beside it on the same cores; the restart takes the spare the
    # template forks once ready
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    (tmp_path / "slowimport.py").write_text("import time\ntime.sleep(1.0)\n")
    spec = launch(script, 2)
    env = {**spec.env, "PYTHONPATH": str(tmp_path)}
    pool = SparePool(spec.command, ("slowimport",), tmp_path, env=env, shutdown=2.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.fill, nursery, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.ready == 0 and pool.template is not None and not pool.template.up
        group = WorkerGroup(spec, on_exit=lambda *_: None, spares=pool, shutdown=2.0)
        await nursery.start(group.run)
        assert group.forked == {2}, "rank 2 did not get the template's spare"
        assert group.warm == {2}  # rank 3 cold: the fill made one spare and ended
        with trio.fail_after(60):
            await group.wait()
        nursery.cancel_scope.cancel()
    # nothing is made: no wait, a cold start at once
    idle = SparePool(spec.command, ("slowimport",), tmp_path, env=env, shutdown=2.0)
    with trio.fail_after(1):
        assert await idle.take_soon(30.0) is None


async def test_a_spare_reports_when_its_preload_is_done(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    spec = launch(script, 1)
    pool = SparePool(spec.command, ("json", "decimal"), tmp_path, env=spec.env, shutdown=2.0)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await pool.fill(nursery, 1)
            spare = pool._ready[0]
            await wait_until_async(
                lambda: any(e["event"] == "spare worker ready" for e in logs),
                what="the spare's 'spare worker ready' log event",
                timeout_s=60,
            )
            assert spare.preloaded
            nursery.cancel_scope.cancel()
    (ready,) = [e for e in logs if e["event"] == "spare worker ready"]
    assert ready["pid"] == spare.pid and ready["seconds"] >= 0 and ready["taken"] is False
    assert ready["forked"] is True  # from the template, which imported json and decimal
    assert list(tmp_path.glob("*.warm")) == []  # its marker goes with it


async def test_a_spare_that_dies_before_use_is_forgotten(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    pool = SparePool((sys.executable, str(script)), ("json",), tmp_path, shutdown=1.0)
    async with trio.open_nursery() as nursery:
        await pool.fill(nursery, 1)
        spare = pool._ready[0]
        os.kill(spare.pid, 9)
        with trio.fail_after(30):
            await spare.handle.wait()
            await trio.testing.wait_all_tasks_blocked()
        assert pool.take() is None  # the next restart starts cold
        assert not pool.enabled  # and no more spares: a spare that dies is not retried
        await pool.fill(nursery, 1)
        assert pool.ready == 0
        nursery.cancel_scope.cancel()
    assert spare.handle.reason is not None


async def test_the_node_stopping_stops_its_spares(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    pool = SparePool((sys.executable, str(script)), ("json",), tmp_path, shutdown=1.0)
    async with trio.open_nursery() as nursery:
        await pool.fill(nursery, 2)
        spares = list(pool._ready)
        assert len(spares) == 2 and pool.enabled
        nursery.cancel_scope.cancel()
    assert all(s.handle.reason is not None for s in spares)
    assert list(tmp_path.glob("*.go")) == []


async def policies_seen(tmp_path: Path, probe: str, *, wake_after: float | None) -> list[str]:
    """Run a spare that preloads module ``probe`` (its source) and whose command prints
    ``policies``, ``probe``'s ``REPORT`` and the command's own scheduling policy; wake it once
    preloaded (``wake_after`` None) or that many seconds after it started. Returns the
    ``policies`` lines it printed."""
    (tmp_path / "probe.py").write_text(probe)
    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys\n"
        "print('policies', *sys.modules['probe'].REPORT, os.sched_getscheduler(0), flush=True)\n"
    )
    lines: list[OutputLine] = []
    spec = launch(script, 1)
    pool = SparePool(
        spec.command,
        ("probe",),
        tmp_path,
        env={**spec.env, "PYTHONPATH": str(tmp_path), "CODE": "0"},
        on_output=lines.append,
        shutdown=2.0,
        fork_server=False,  # a spawned spare: the template imports at normal priority
    )
    async with trio.open_nursery() as nursery:
        await pool.fill(nursery, 1)
        spare = pool.take()
        assert spare is not None
        with trio.fail_after(60):
            if wake_after is None:
                while not spare.preloaded:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            else:
                await trio.sleep(wake_after)
                assert not spare.preloaded  # still importing
            spare.wake({"RANK": "0"}, "worker 0")
            await spare.handle.wait()
    return [line.text for line in lines if line.text.startswith("policies")]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no idle scheduling class here")
async def test_a_spare_imports_at_idle_priority_and_trains_at_normal(tmp_path: Path) -> None:
    """The preload runs in an idle-class thread; the spare itself imports nothing else (not
    even the supervise package, whose import would take normal-priority CPU)."""
    probe = "import os, sys\nREPORT = [os.sched_getscheduler(0), 'supervise' in sys.modules]\n"
    seen = await policies_seen(tmp_path, probe, wake_after=None)
    assert seen == [f"policies {os.SCHED_IDLE} False {os.SCHED_OTHER}"]


@pytest.mark.skipif(
    not hasattr(os, "SCHED_IDLE") or os.geteuid() != 0,
    reason="leaving the idle scheduling class needs root (or CAP_SYS_NICE)",
)
async def test_a_spare_taken_while_importing_finishes_at_normal_priority(tmp_path: Path) -> None:
    probe = (
        "import os, time\n"
        "before = os.sched_getscheduler(0)\n"
        "time.sleep(1.5)  # the go order arrives meanwhile\n"
        "REPORT = [before, os.sched_getscheduler(0)]\n"
    )
    seen = await policies_seen(tmp_path, probe, wake_after=0.5)
    assert seen == [f"policies {os.SCHED_IDLE} {os.SCHED_OTHER} {os.SCHED_OTHER}"]
