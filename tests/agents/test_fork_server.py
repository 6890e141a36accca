"""The node's fork server with real processes: spares forked from the template are this
process's own children (exit codes, signals, process groups as for spawned ones), a template
that dies is restarted while spares are spawned meanwhile, and a worker forked from a template
that imported torch trains bit for bit like a spawned one."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio
from structlog.testing import capture_logs

from supervise._testing.poll import wait_until_async
from supervise._testing.procs import PidBook
from supervise.agents.workers import Launch, SparePool, WorkerGroup, free_port
from supervise.runtime import ExitKind, ExitReason
from supervise.runtime.procfs import stat_fields

pytestmark = pytest.mark.slow

SCRIPT = "import os, sys\nsys.exit(int(os.environ['CODE']))\n"


@pytest.fixture
def pids() -> Iterator[PidBook]:
    book = PidBook()
    try:
        yield book
    finally:
        left = book.kill_survivors()
        assert left == [], f"left running: {left}"


def parent_and_group(pid: int) -> tuple[int, int]:
    fields = stat_fields(pid)
    return int(fields[1]), int(fields[2])


async def test_the_template_is_restarted_and_spawning_covers_meanwhile(
    tmp_path: Path, pids: PidBook
) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    pool = SparePool((sys.executable, str(script)), ("json",), tmp_path, shutdown=1.0)
    template = pool.template
    assert template is not None
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await pool.fill(nursery, 1)
            first = pool._ready[0]
            old = template.pid
            assert first.forked and old is not None
            pids.add(old, "template")
            pids.add(first.pid, "forked spare")
            # The agent's own child, leading its own process group, as a spawned worker does.
            assert parent_and_group(first.pid) == (os.getpid(), first.pid)

            os.kill(old, signal.SIGKILL)  # the template dies...
            await wait_until_async(
                lambda: not template.up, what="the template seen gone", timeout_s=30
            )
            await pool.fill(nursery, 2)  # ...and spares are spawned meanwhile
            spawned = pool._ready[1]
            pids.add(spawned.pid, "spawned spare")
            assert not spawned.forked
            await wait_until_async(lambda: template.up, what="the template restarted", timeout_s=60)
            assert template.pid not in (None, old)
            pids.add(template.pid or 0, "template")
            await pool.fill(nursery, 3)
            third = pool._ready[2]
            pids.add(third.pid, "forked spare")
            assert third.forked

            # The first spare outlived its template; taken, it exits with its own code.
            assert pool.take() is first
            first.wake({"CODE": "3"}, "worker 0")
            with trio.fail_after(30):
                reason = await first.handle.wait()
            assert (reason.kind, reason.exit_code) == (ExitKind.ABNORMAL, 3)
            # Killed by PID (its group), it reports the signal.
            third.handle.signal(signal.SIGKILL)
            with trio.fail_after(30):
                reason = await third.handle.wait()
            assert reason.signal == signal.SIGKILL
            nursery.cancel_scope.cancel()
    assert [e["event"] for e in logs if e["event"] == "spare template ready"] == [
        "spare template ready"
    ] * 2
    assert pids.survivors() == []  # the node stopping stops the template and every spare


async def test_a_template_whose_imports_started_threads_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "threaded.py").write_text(
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    )
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    pool = SparePool(
        (sys.executable, str(script)),
        ("threaded",),
        tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
        shutdown=1.0,
    )
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await pool.fill(nursery, 1)
            assert not pool._ready[0].forked  # spawned: a fork would copy the thread's locks
            nursery.cancel_scope.cancel()
    assert [e["threads"] for e in logs if e["event"].startswith("spare template not used")] == [2]


def launch(out: Path, generation: int) -> Launch:
    return Launch(
        command=(
            sys.executable,
            "-m",
            "supervise._demo.train",
            "--steps",
            "8",
            "--hidden",
            "32",
            "--out",
            str(out),
        ),
        node_rank=0,
        nproc=2,
        n_nodes=1,
        generation=generation,
        master_addr="127.0.0.1",
        master_port=0,
        agent="",  # standalone Snapshotters: no agent to talk to
    )


async def run_generation(
    spec: Launch, pool: SparePool | None, nursery: trio.Nursery, pids: PidBook
) -> dict[int, ExitReason]:
    spec = attrs.evolve(spec, master_port=free_port("127.0.0.1"))
    exits: dict[int, ExitReason] = {}
    group = WorkerGroup(
        spec, on_exit=lambda r, _p, why: exits.__setitem__(r, why), spares=pool, shutdown=2.0
    )
    await nursery.start(group.run)
    for pid in group.pids.values():
        pids.add(pid, "worker")
    with trio.fail_after(240):
        await group.wait()
    assert group.forked == (set(spec.ranks()) if pool is not None else set())
    return exits


async def test_a_forked_worker_trains_bit_exactly_like_a_spawned_one(
    tmp_path: Path, pids: PidBook
) -> None:
    """Two ranks over gloo, forked from a template that imported torch, end with the same
    parameters as two cold ones: no thread pool, OpenMP state or process group came along."""
    torch = pytest.importorskip("torch")
    cold, forked = tmp_path / "cold.pt", tmp_path / "forked.pt"
    preload = ("torch", "torch._dynamo", "supervise.torch.snapshotter")
    pool = SparePool(launch(forked, 2).command, preload, tmp_path, shutdown=2.0)
    async with trio.open_nursery() as nursery:
        filled = trio.Event()

        async def fill() -> None:  # the template imports while the cold generation runs
            await pool.fill(nursery, 2)
            filled.set()

        nursery.start_soon(fill)
        exits = await run_generation(launch(cold, 1), None, nursery, pids)
        assert {r: why.exit_code for r, why in exits.items()} == {0: 0, 1: 0}
        with trio.fail_after(240):
            await filled.wait()
        assert all(spare.forked for spare in pool._ready)
        exits = await run_generation(launch(forked, 2), pool, nursery, pids)
        assert {r: why.exit_code for r, why in exits.items()} == {0: 0, 1: 0}
        nursery.cancel_scope.cancel()
    a, b = torch.load(cold), torch.load(forked)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
