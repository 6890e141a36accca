"""Spec validation (clear one-line errors) and the structlog events of a child's life."""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

import supervise as sv


async def work() -> None:
    await trio.sleep_forever()


class Srv(sv.Server):
    pass


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: sv.child(work, id=""), "id"),
        (lambda: sv.child(print, id="x"), "target"),
        (lambda: sv.child(work, id="x", restart="sometimes"), "restart"),
        (lambda: sv.child(work, id="x", shutdown=-1), "shutdown"),
        (lambda: sv.child(work, id="x", shutdown="5"), "shutdown"),
        (lambda: sv.child(work, id="x", significant=True), "significant"),
        (lambda: sv.child(work, id="x", significant="yes", restart="temporary"), "significant"),
        (lambda: sv.child(work, id="x", name="n"), "name"),
        (lambda: sv.child(Srv, id="x", name=""), "name"),
        (lambda: sv.child(sv.Supervisor([]), 1, id="x"), "args"),
        (lambda: sv.child(sv.OsProcess(["true"]), id="x", name="n"), "name"),
        (lambda: sv.child(work, id="x", task_status=None), "kwargs"),
        (lambda: sv.Supervisor([sv.child(work, id="a"), sv.child(work, id="a")]), "children"),
        (lambda: sv.Supervisor(sv.child(work, id="a")), "children"),
        (lambda: sv.Supervisor(["not a spec"]), "children"),
        (lambda: sv.Supervisor([], strategy="one_for_some"), "strategy"),
        (lambda: sv.Supervisor([], max_restarts=-1), "max_restarts"),
        (lambda: sv.Supervisor([], max_restarts=1.5), "max_restarts"),
        (lambda: sv.Supervisor([], max_seconds=0), "max_seconds"),
        (lambda: sv.Supervisor([], backoff=1.0), "backoff"),
        (lambda: sv.Supervisor([], auto_shutdown="sometimes"), "auto_shutdown"),
        (
            lambda: sv.Supervisor([sv.child(work, id="a", restart="transient", significant=True)]),
            "significant",
        ),
        (lambda: sv.DynamicSupervisor(max_children=0), "max_children"),
        (lambda: sv.DynamicSupervisor(max_seconds=-1), "max_seconds"),
        (lambda: sv.OsProcess("python train.py"), "argv"),
        (lambda: sv.OsProcess([]), "argv"),
        (lambda: sv.OsProcess(["python", 3]), "argv"),
        (lambda: sv.OsProcess(["true"], env={"A": 1}), "env"),
        (lambda: sv.OsProcess(["true"], cwd=3), "cwd"),
        (lambda: sv.OsProcess(["true"], on_output="log"), "on_output"),
    ],
)
def test_bad_specs_name_the_field(build: Any, field: str) -> None:
    with pytest.raises(sv.InvalidValue) as info:
        build()
    assert info.value.field == field
    assert "\n" not in str(info.value)


def test_spec_defaults() -> None:
    spec = sv.child(work, id="w")
    assert (spec.restart, spec.shutdown, spec.significant, spec.kind) == (
        sv.Restart.PERMANENT,
        5.0,
        False,
        "worker",
    )
    sup_spec = sv.child(sv.Supervisor([]), id="s")
    assert sup_spec.shutdown == math.inf and sup_spec.kind == "supervisor"
    assert sv.child(work, id="w", shutdown=None).shutdown == math.inf
    assert sv.child(Srv, 1, id="srv", name="srv", x=2).kwargs == {"x": 2}
    sup = sv.Supervisor([spec])
    assert (
        sup.strategy is sv.Strategy.ONE_FOR_ONE and sup.max_restarts == 3 and sup.max_seconds == 5.0
    )
    assert sup.backoff is None and sup.auto_shutdown is sv.AutoShutdown.NEVER


def test_exit_reason_strings() -> None:
    assert str(sv.ExitReason(sv.ExitKind.NORMAL)) == "normal"
    assert str(sv.ExitReason.from_returncode(3)) == "abnormal: exit code 3"
    assert str(sv.ExitReason.from_returncode(-9)) == "abnormal: signal SIGKILL"
    assert str(sv.ExitReason.from_returncode(-15, stopped=True)) == "shutdown: signal SIGTERM"
    assert str(sv.ExitReason.from_exception(ValueError("bad"))) == "abnormal: ValueError: bad"
    assert sv.ExitReason.from_exception(sv.Shutdown()).kind is sv.ExitKind.SHUTDOWN
    assert sv.ExitReason.from_returncode(0).abnormal is False


def test_errors_stay_one_line_whatever_the_child_raised() -> None:
    """Libraries (torch among them) raise multi-line messages: the exit reason, and so GaveUp
    and StartFailed, keep the first line; the full exception stays chained as __cause__."""
    exc = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1\nunhandled cuda error\nmore")
    reason = sv.ExitReason.from_exception(exc)
    assert str(reason) == "abnormal: RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1 [...]"
    gave_up = sv.GaveUp("root", "w", reason, "more than 3 restarts within 5 s")
    started = sv.StartFailed("w", reason)
    for err in (gave_up, started):
        assert "\n" not in str(err)
        assert err.__cause__ is exc


async def test_a_childs_life_is_logged(autojump_clock: trio.abc.Clock) -> None:
    async def crashy() -> None:
        await trio.sleep(1)
        raise RuntimeError("boom")

    sup = sv.Supervisor(
        [sv.child(crashy, id="w")], max_restarts=1, max_seconds=60, backoff=sv.Backoff(initial=2.0)
    )
    with capture_logs() as logs, pytest.raises(sv.GaveUp):
        await sup.run()
    events = [(e["event"], e.get("child")) for e in logs]
    assert events == [
        ("child_started", "w"),
        ("child_exited", "w"),
        ("child_restart_scheduled", "w"),
        ("child_restarted", "w"),
        ("child_exited", "w"),
        ("supervisor_gave_up", "w"),
        ("supervisor_stopped", None),
    ]
    exited = logs[1]
    assert exited["log_level"] == "error" and exited["reason"] == "abnormal"
    assert isinstance(exited["exc_info"], RuntimeError)
    assert logs[2]["delay"] == 2.0
    assert logs[3]["restarts"] == 1
    assert all(e["supervisor"] == "root" for e in logs)
    assert logs[-1]["reason"] == "GaveUp"


async def test_shutdown_exits_are_logged_at_info(autojump_clock: trio.abc.Clock) -> None:
    inner = sv.Supervisor([sv.child(work, id="leaf")])
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(inner, id="inner")]).run)
        with capture_logs() as logs:
            await ref.stop()
    exits = [
        (e["supervisor"], e["child"], e["reason"], e["log_level"])
        for e in logs
        if e["event"] == "child_exited"
    ]
    assert exits == [
        ("root/inner", "leaf", "shutdown", "info"),
        ("root", "inner", "shutdown", "info"),
    ]


async def test_a_failed_restart_is_logged_as_a_start_failure(
    autojump_clock: trio.abc.Clock,
) -> None:
    inits: list[int] = []

    class SecondInitFails(sv.Server):
        async def init(self) -> None:
            inits.append(1)
            if len(inits) == 2:
                raise ConnectionError("backend down")

        def handle_cast(self, message: Any) -> None:
            raise RuntimeError("crash")

    async with trio.open_nursery() as nursery:
        ref = await nursery.start(sv.Supervisor([sv.child(SecondInitFails, id="s", name="s")]).run)
        with capture_logs() as logs:
            sv.whereis("s").cast("crash")  # type: ignore[union-attr]
            await trio.sleep(1)
        await ref.stop()
    events = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("child_")]
    assert events == [
        ("child_exited", "error"),
        ("child_start_failed", "error"),
        ("child_restarted", "info"),
    ]
    assert len(inits) == 3


async def test_a_broken_logging_pipeline_does_not_break_supervision(
    autojump_clock: trio.abc.Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    import structlog

    from supervise.runtime._log import log as runtime_log

    def explode(_logger: Any, _name: str, _event: Any) -> Any:
        raise BrokenPipeError("stdout is gone")

    starts: list[float] = []

    async def crashy() -> None:
        starts.append(trio.current_time())
        await trio.sleep(1)
        raise RuntimeError("boom")

    # In place, as capture_logs does: a logger cached on first use holds this very list.
    processors = structlog.get_config()["processors"]
    saved = list(processors)
    before = runtime_log.failures
    processors[:] = [explode]
    try:
        async with trio.open_nursery() as nursery:
            ref = await nursery.start(
                sv.Supervisor([sv.child(crashy, id="c")], max_restarts=100).run
            )
            await trio.sleep(3.5)
            await ref.stop()
    finally:
        processors[:] = saved
    assert len(starts) == 4
    assert runtime_log.failures > before
    assert capsys.readouterr().err.count("supervise: logging") <= 1
