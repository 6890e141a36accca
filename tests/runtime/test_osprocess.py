"""Real OS-process children: exit reasons, output forwarding, SIGTERM -> SIGKILL, no orphans.

Every process a test starts is killed by PID in a finally block, also when the test fails.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

import supervise as sv

PY = sys.executable


def script(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # pragma: no cover (no /proc: fall back to signal 0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def kill_quietly(*pids: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """PIDs to SIGKILL after the test, whatever happened."""
    started: list[int] = []
    yield started
    kill_quietly(*started)


async def wait_dead(pid: int, seconds: float = 10.0) -> bool:
    """Poll (real time, bounded) until ``pid`` is gone."""
    with trio.move_on_after(seconds):
        while alive(pid):  # noqa: ASYNC110 (nothing to wait on for another process's death)
            await trio.sleep(0.02)
    return not alive(pid)


class Lines:
    """An on_output sink that lets a test wait for a line."""

    def __init__(self) -> None:
        self.lines: list[sv.OutputLine] = []
        self._changed = trio.Event()

    def __call__(self, line: sv.OutputLine) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    def texts(self, stream: str = "stdout") -> list[str]:
        return [line.text for line in self.lines if line.stream == stream]

    async def wait_for_count(self, prefix: str, count: int) -> None:
        """Until ``count`` lines start with ``prefix`` (real time, bounded by the caller)."""
        while sum(line.text.startswith(prefix) for line in self.lines) < count:
            await self._changed.wait()

    async def wait_for(self, predicate: str) -> sv.OutputLine:
        """The first line containing ``predicate``, within 60 s of real time (no limit under
        autojump_clock, where it would be virtual time)."""
        virtual = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        with trio.fail_after(math.inf if virtual else 60):
            while True:
                for line in self.lines:
                    if predicate in line.text:
                        return line
                await self._changed.wait()


@pytest.mark.parametrize(
    ("code", "kind", "exit_code", "signum"),
    [
        ("pass", sv.ExitKind.NORMAL, 0, None),
        ("import sys; sys.exit(3)", sv.ExitKind.ABNORMAL, 3, None),
        (
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
            sv.ExitKind.ABNORMAL,
            None,
            signal.SIGKILL,
        ),
    ],
)
async def test_exit_reasons(
    code: str, kind: sv.ExitKind, exit_code: int | None, signum: int | None
) -> None:
    reason = await sv.OsProcess(script(code)).run()
    assert reason.kind is kind
    assert reason.exit_code == exit_code
    assert reason.signal == signum
    if signum is not None:
        assert "SIGKILL" in str(reason)


async def test_output_is_forwarded_line_by_line(pids: list[int]) -> None:
    sink = Lines()
    code = """
        import sys
        print("first")
        print("to stderr", file=sys.stderr)
        sys.stdout.write("héllo\\r\\nno newline at the end")
    """
    proc = sv.OsProcess(script(code), on_output=sink)
    with capture_logs() as logs:
        reason = await proc.run()
    assert reason.kind is sv.ExitKind.NORMAL
    assert sink.texts("stdout") == ["first", "héllo", "no newline at the end"]
    assert sink.texts("stderr") == ["to stderr"]
    forwarded = [(e["stream"], e["line"]) for e in logs if e["event"] == "process_output"]
    assert ("stdout", "first") in forwarded and ("stderr", "to stderr") in forwarded
    events = [e["event"] for e in logs]
    assert events[0] == "process_started" and events[-1] == "process_exited"


async def test_env_and_cwd(tmp_path: os.PathLike[str]) -> None:
    sink = Lines()
    code = (
        "import os; "
        "print(os.environ['SUPERVISE_TEST'], os.environ.get('PATH') is not None, os.getcwd())"
    )
    await sv.OsProcess(
        script(code), env={"SUPERVISE_TEST": "42"}, cwd=tmp_path, on_output=sink
    ).run()
    assert sink.texts() == [f"42 True {os.fspath(tmp_path)}"]
    sink = Lines()
    await sv.OsProcess(
        script(code.replace(", os.environ.get('PATH') is not None", "")),
        env={"SUPERVISE_TEST": "7"},
        inherit_env=False,
        on_output=sink,
        cwd=tmp_path,
    ).run()
    assert sink.texts() == [f"7 {os.fspath(tmp_path)}"]


@pytest.mark.parametrize("fds", [[1], ["3"], [True]])
def test_pass_fds_must_be_descriptors_above_stderr(fds: list[object]) -> None:
    with pytest.raises(ValueError, match="pass_fds"):
        sv.OsProcess(["true"], pass_fds=fds)  # type: ignore[arg-type]


async def test_spawn_failure_raises() -> None:
    with pytest.raises(FileNotFoundError):
        await sv.OsProcess(["/nonexistent/definitely-not-here"]).run()


async def test_stop_sends_sigterm_and_keeps_the_last_words(pids: list[int]) -> None:
    sink = Lines()
    code = """
        import signal, sys, time
        def bye(*_):
            print("saving and exiting", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        time.sleep(60)
    """
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(
            functools.partial(sv.OsProcess(script(code), on_output=sink).run, shutdown=30)
        )
        pids.append(handle.pid)
        await sink.wait_for("ready")
        reason = await handle.stop()
    assert reason.kind is sv.ExitKind.SHUTDOWN and reason.exit_code == 0
    assert sink.texts()[-1] == "saving and exiting"
    assert not alive(handle.pid)


async def test_sigterm_ignored_means_sigkill_after_the_shutdown_time(
    pids: list[int], autojump_clock: trio.abc.Clock
) -> None:
    """Virtual time: the 5 s grace elapses at once, the process still ignores SIGTERM."""
    sink = Lines()
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """
    sup = sv.Supervisor(
        [sv.child(sv.OsProcess(script(code), on_output=sink), id="stubborn", shutdown=5)]
    )
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(sup.run)
            [info] = await ref.which_children()
            handle = info.ref
            assert isinstance(handle, sv.ProcessHandle)
            pids.append(handle.pid)
            await sink.wait_for("ready")
            t0 = trio.current_time()
            await ref.stop()
            assert trio.current_time() - t0 >= 5.0
    assert handle.reason is not None
    assert handle.reason.kind is sv.ExitKind.SHUTDOWN and handle.reason.signal == signal.SIGKILL
    assert "process_kill" in [e["event"] for e in logs]
    assert not alive(handle.pid)


async def test_supervised_process_is_restarted_after_a_crash(pids: list[int]) -> None:
    sink = Lines()
    code = """
        import os, sys
        print("pid", os.getpid(), flush=True)
        sys.exit(7)
    """
    sup = sv.Supervisor(
        [sv.child(sv.OsProcess(script(code), on_output=sink), id="w")],
        max_restarts=2,
        max_seconds=60,
    )
    with capture_logs() as logs, pytest.raises(sv.GaveUp) as info:
        await sup.run()
    started = [line for line in sink.texts() if line.startswith("pid")]
    pids.extend(int(line.split()[1]) for line in started)
    assert len(started) == 3
    assert info.value.reason.exit_code == 7
    assert isinstance(info.value.__cause__, sv.ChildFailed)
    assert "exit code 7" in str(info.value)
    exits = [e for e in logs if e["event"] == "child_exited"]
    assert [e["exit_code"] for e in exits] == [7, 7, 7]


GRANDPARENT = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print("pids", os.getpid(), child.pid, flush=True)
    time.sleep(120)
"""


async def test_no_orphans_when_the_tree_is_cancelled(pids: list[int]) -> None:
    sink = Lines()
    sup = sv.Supervisor([sv.child(sv.OsProcess(script(GRANDPARENT), on_output=sink), id="w")])
    with trio.move_on_after(60) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            line = await sink.wait_for("pids")
            leader, grandchild = map(int, line.text.split()[1:])
            pids.extend([leader, grandchild])
            assert alive(leader) and alive(grandchild)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert await wait_dead(leader) and await wait_dead(grandchild)


async def test_no_orphans_when_the_tree_crashes(pids: list[int]) -> None:
    sink = Lines()

    async def doomed() -> None:
        await sink.wait_for("pids")
        raise RuntimeError("sibling crash")

    sup = sv.Supervisor(
        [
            sv.child(sv.OsProcess(script(GRANDPARENT), on_output=sink), id="w"),
            sv.child(doomed, id="doomed"),
        ],
        strategy="one_for_all",
        max_restarts=0,
    )
    with pytest.raises(sv.GaveUp):
        await sup.run()
    line = await sink.wait_for("pids")
    leader, grandchild = map(int, line.text.split()[1:])
    pids.extend([leader, grandchild])
    assert await wait_dead(leader) and await wait_dead(grandchild)


async def test_no_orphans_when_the_process_exits_leaving_children(pids: list[int]) -> None:
    sink = Lines()
    code = """
        import os, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("pids", os.getpid(), child.pid, flush=True)
    """
    reason = await sv.OsProcess(script(code), on_output=sink).run()
    assert reason.kind is sv.ExitKind.NORMAL
    line = await sink.wait_for("pids")
    leader, grandchild = map(int, line.text.split()[1:])
    pids.extend([leader, grandchild])
    assert await wait_dead(grandchild)


HOST = """
    import sys, trio, supervise as sv
    async def main():
        proc = sv.OsProcess(sys.argv[1:], on_output=lambda line: print(line.text, flush=True))
        async with trio.open_nursery() as nursery:
            await nursery.start(sv.Supervisor([sv.child(proc, id="w")]).run)
            await trio.sleep_forever()
    trio.run(main)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
async def test_no_orphans_when_the_supervising_process_is_killed_hard(pids: list[int]) -> None:
    """kill -9 of the agent process: its OS-process child and that child's own children die."""
    host = await trio.lowlevel.open_process(
        [*script(HOST), *script(GRANDPARENT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    pids.append(host.pid)
    try:
        assert host.stdout is not None
        output = b""
        found: list[bytes] = []
        with trio.fail_after(60):
            while not found:
                chunk = await host.stdout.receive_some()
                assert chunk, f"host exited early: {output!r}"
                output += chunk
                complete = output.rpartition(b"\n")[0].splitlines()
                found = [line for line in complete if line.startswith(b"pids ")]
        leader, grandchild = map(int, found[0].split()[1:])
        pids.extend([leader, grandchild])
        assert alive(leader) and alive(grandchild)
        os.kill(host.pid, signal.SIGKILL)
        await host.wait()
        assert await wait_dead(leader)
        assert await wait_dead(grandchild)
    finally:
        kill_quietly(host.pid)
        with trio.CancelScope(shield=True):
            await host.wait()
            if host.stdout is not None:
                await host.stdout.aclose()


async def test_handle_stop_from_another_task_and_signal(pids: list[int]) -> None:
    sink = Lines()
    code = """
        import signal, time
        signal.signal(signal.SIGUSR1, lambda *_: print("usr1", flush=True))
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(sv.OsProcess(script(code), on_output=sink).run)
        pids.append(handle.pid)
        await sink.wait_for("ready")
        handle.signal(signal.SIGUSR1)
        await sink.wait_for("usr1")
        assert handle.returncode is None
        reason = await handle.stop(timeout=10)
        assert reason.kind is sv.ExitKind.SHUTDOWN and reason.signal == signal.SIGTERM
        assert await handle.wait() is reason
        assert handle.returncode == -signal.SIGTERM


async def test_a_reaped_process_is_never_signalled(
    pids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the leader is reaped its pid (= its group id) may be reused: no signal may go to it,
    also when the task is cancelled while the last output is still being drained."""
    from supervise.runtime import osprocess

    monkeypatch.setattr(osprocess, "_DRAIN_GRACE", 60.0)  # a wide window to cancel in
    code = """
        import subprocess, sys
        # escapes the group and keeps our stdout open: the drain waits after the leader exited
        holder = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
        )
        print("holder", holder.pid, flush=True)
    """
    sink = Lines()
    handle: sv.ProcessHandle | None = None
    after_reap: list[int] = []
    real_killpg = os.killpg

    def killpg(pgid: int, signum: int) -> None:
        if handle is not None and pgid == handle.pid and handle._popen.returncode is not None:
            after_reap.append(signum)
        real_killpg(pgid, signum)

    monkeypatch.setattr(os, "killpg", killpg)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(sv.OsProcess(script(code), on_output=sink).run)
            pids.append(handle.pid)
            holder = int((await sink.wait_for("holder")).text.split()[1])
            pids.append(holder)
            while handle._popen.returncode is None:  # noqa: ASYNC110 (polling another process)
                await trio.sleep(0.01)
            assert handle.reason is None  # reaped, still draining
            nursery.cancel_scope.cancel()
            kill_quietly(holder)  # lets the drain finish
    assert after_reap == []
    assert handle.reason is not None and handle.reason.kind is sv.ExitKind.NORMAL


async def test_a_failing_sink_does_not_kill_the_process() -> None:
    def bad_sink(line: sv.OutputLine) -> None:
        raise ValueError("sink bug")

    with capture_logs() as logs:
        reason = await sv.OsProcess(script("print(1); print(2)"), on_output=bad_sink).run()
    assert reason.kind is sv.ExitKind.NORMAL
    assert [e["event"] for e in logs].count("process_output_sink_failed") == 1


def test_without_a_guard_processes_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the guard cannot start, one warning; spawning goes on (PDEATHSIG still applies)."""
    from supervise.runtime import _guard

    fresh = _guard._Guard()
    monkeypatch.setattr(_guard.sys, "executable", "")
    with capture_logs() as logs:
        fresh.watch(12345)
        fresh.forget(12345)
    assert [e["event"] for e in logs] == ["process_guard_unavailable"]


@pytest.mark.slow
async def test_children_outlive_idle_worker_threads(pids: list[int]) -> None:
    """PR_SET_PDEATHSIG fires when the *forking thread* exits: children must not be forked by
    trio's worker threads, which retire after 10 idle seconds (real time, ~11 s)."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(sv.OsProcess(sleeper, log_output=False).run)
        pids.append(handle.pid)
        await trio.sleep(11)
        assert handle.reason is None and alive(handle.pid)
        reason = await handle.stop()
    assert reason.kind is sv.ExitKind.SHUTDOWN


async def test_one_for_all_workers_are_restarted_together(pids: list[int], tmp_path: Path) -> None:
    """The node's workers supervisor: when one rank dies, every rank is replaced."""
    sink = Lines()
    rank_code = """
        import os, sys, time
        rank, marker = sys.argv[1], sys.argv[2]
        print("rank", rank, os.getpid(), flush=True)
        if rank == "1" and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(0.3)
            sys.exit(5)
        time.sleep(120)
    """
    marker = str(tmp_path / "crashed-once")
    workers = sv.Supervisor(
        [
            sv.child(
                sv.OsProcess([*script(rank_code), str(r), marker], on_output=sink), id=f"rank{r}"
            )
            for r in range(3)
        ],
        strategy="one_for_all",
        max_restarts=1,
        max_seconds=60,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(workers.run)
            first = {c.id: c.ref.pid for c in await ref.which_children()}
            pids.extend(first.values())
            await sink.wait_for_count("rank", 6)  # the 3 first ranks, then the 3 restarted ones
            second = {c.id: c.ref.pid for c in await ref.which_children()}
            pids.extend(second.values())
            assert all(first[r] != second[r] for r in first)
            assert not any(alive(pid) for pid in first.values())
            assert all(alive(pid) for pid in second.values())
            restarts = {c.id: c.restarts for c in await ref.which_children()}
            assert restarts == {"rank0": 1, "rank1": 1, "rank2": 1}
            await ref.stop()
    assert not any(alive(pid) for pid in second.values())
