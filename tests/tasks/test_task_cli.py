"""`supervise tasks ...` against an in-process fake farm: what each command sends and prints
(text and --json), bad input refused in one line with exit 2 before the farm is contacted,
the farm's refusals as one line with exit 1 (2 when no node could ever run the task)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from supervise.cli import main
from supervise.cli import tasks as cli_tasks
from supervise.tasks.farm import FarmError, TaskCancelled, TaskInfo, Unschedulable
from supervise.tasks.resources import Resources
from supervise.tasks.runner import TaskFailed
from supervise.tasks.states import Reason, TaskState, Transition

NODES = ["--nodes", "127.0.0.1:7001,127.0.0.1:7002"]


def _info(task_id: str, state: TaskState = TaskState.RUNNING, node: int | None = 1) -> TaskInfo:
    return TaskInfo(
        id=task_id,
        state=state,
        node=node,
        attempt=2,
        progress=0.5,
        target="taskfuncs:two_steps",
        priority=0,
        needs=Resources(1, 1 << 30),
        reason="started",
        error=None,
        submitted=1.0,
        updated=2.0,
        history=(
            Transition(None, TaskState.PENDING, Reason.SUBMITTED, 0.0, wall_time=1.0),
            Transition(TaskState.PENDING, TaskState.ASSIGNED, Reason.PLACED, 1.0, "node=1", 2.0),
        ),
    )


class _Ref:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id


class FakeFarm:
    """Records what it was asked; answers from ``outcomes`` (a value or an exception)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.opened = 0
        self.raises: BaseException | None = None
        self.value: Any = {"rows": 3, "pair": (1, 2), "raw": b"\x00\x01"}

    async def __aenter__(self) -> FakeFarm:
        self.opened += 1
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if self.raises is not None:
            raise self.raises

    async def submit(self, target: str, *args: Any, **kwargs: Any) -> _Ref:
        self._call("submit", target, *args, **kwargs)
        return _Ref("abc123")

    async def list(self) -> list[TaskInfo]:
        self._call("list")
        return [_info("abc123"), _info("def456", TaskState.PENDING, None)]

    async def show(self, task_id: str) -> TaskInfo:
        self._call("show", task_id)
        return _info(task_id)

    async def result(
        self,
        task_id: str,
        *,
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        self._call("result", task_id, wait=wait, timeout=timeout)
        return self.value

    async def cancel(self, task_id: str) -> TaskInfo:
        self._call("cancel", task_id)
        return _info(task_id, TaskState.CANCELLED)

    async def pause(self, task_id: str) -> TaskInfo:
        self._call("pause", task_id)
        return _info(task_id, TaskState.PAUSED)

    async def resume(self, task_id: str) -> TaskInfo:
        self._call("resume", task_id)
        return _info(task_id, TaskState.PENDING)


@pytest.fixture
def farm(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[FakeFarm]:
    fake = FakeFarm()
    monkeypatch.setattr(cli_tasks, "open_farm", lambda args: fake)
    monkeypatch.syspath_prepend(str(request.path.parent))  # taskfuncs importable
    yield fake


def test_submit_prints_the_id_and_sends_everything(
    farm: FakeFarm, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tasks", "submit", *NODES, "taskfuncs:two_steps", "21", '"key"']
    flags = ["--cpu", "0.5", "--memory", "1.5G", "--gpus", "1", "--label", "zone=a"]
    assert main([*argv, *flags, "--priority", "3", "--max-attempts", "5"]) == 0
    assert capsys.readouterr().out == "abc123\n"
    (call,) = farm.calls
    assert call == (
        "submit",
        ("taskfuncs:two_steps", 21, "key"),
        {
            "cpu": 0.5,
            "memory": 1_500_000_000,
            "gpus": 1,
            "labels": ["zone=a"],
            "priority": 3,
            "max_attempts": 5,
        },
    )
    assert main(["tasks", "submit", *NODES, "--json", "taskfuncs:two_steps", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": "abc123"}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["nomodule_here:f"], "cannot import nomodule_here"),
        (["taskfuncs:nothing"], "taskfuncs has no nothing"),
        (["taskfuncs:double", "1"], "not an async function"),
        (["taskfuncs:two_steps"], "its arguments do not fit"),
        (["not a target"], "must be MODULE:FUNC"),
        (["taskfuncs:two_steps", "{x"], "ARG_JSON 1 '{x' is not JSON"),
        (["taskfuncs:two_steps", str(1 << 70)], "args[0]"),
        (["taskfuncs:two_steps", "1", "--memory", "lots"], "--memory = 'lots'"),
        (["taskfuncs:two_steps", "1", "--cpu", "-1"], "--cpu = -1.0"),
        (["taskfuncs:two_steps", "1", "--gpus", "-2"], "--gpus = -2"),
        (["taskfuncs:two_steps", "1", "--label", "zone"], "--label = 'zone'"),
        (["taskfuncs:two_steps", "1", "--max-attempts", "0"], "--max-attempts = 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_farm_is_contacted(
    farm: FakeFarm, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    assert main(["tasks", "submit", *NODES, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("supervise tasks submit: ") and says in err
    assert farm.opened == 0


def test_a_client_that_cannot_be_built_is_bad_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    monkeypatch.delenv("SUPERVISE_NODES", raising=False)  # the client's fallback
    assert main(["tasks", "submit", "taskfuncs:two_steps", "1"]) == 2  # no --nodes
    assert main(["tasks", "list"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("supervise tasks submit: no farm nodes")
    assert err[1].startswith("supervise tasks list: no farm nodes")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Unschedulable("needs 64 cpu; the largest node has 8"), 2),
        (FarmError("no farm coordinator answered within 10 s"), 1),
    ],
)
def test_the_farms_refusals_are_one_line(
    farm: FakeFarm, capsys: pytest.CaptureFixture[str], error: FarmError, status: int
) -> None:
    farm.raises = error
    assert main(["tasks", "submit", *NODES, "taskfuncs:two_steps", "1", "--cpu", "64"]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(error) in err


def test_list_and_show(farm: FakeFarm, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "list", *NODES]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "NODE", "ATTEMPT", "PROGRESS", "TARGET"]
    assert lines[1].split() == ["abc123", "running", "1", "2", "50%", "taskfuncs:two_steps"]
    assert lines[2].split()[:3] == ["def456", "pending", "-"]
    assert main(["tasks", "list", *NODES, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in listed] == ["abc123", "def456"]

    assert main(["tasks", "show", *NODES, "abc123"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("task abc123: running (started)\n")
    assert "pending -> assigned (placed) node=1" in out
    assert main(["tasks", "show", *NODES, "abc123", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: shown[k] for k in ("id", "state", "node", "attempt", "progress")} == {
        "id": "abc123",
        "state": "running",
        "node": 1,
        "attempt": 2,
        "progress": 0.5,
    }
    farm.raises = FarmError("no task 'zzz'")
    assert main(["tasks", "show", *NODES, "zzz"]) == 1
    assert capsys.readouterr().err == "supervise tasks show: no task 'zzz'\n"


def test_result(farm: FakeFarm, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tasks", "result", *NODES, "abc123", "--json", "--wait", "--timeout", "9"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": 3, "pair": [1, 2], "raw": "AAE="}
    assert farm.calls[-1] == ("result", ("abc123",), {"wait": True, "timeout": 9.0})
    assert main(["tasks", "result", *NODES, "abc123"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 3
    assert farm.calls[-1] == ("result", ("abc123",), {"wait": False, "timeout": None})

    np = pytest.importorskip("numpy")
    farm.value = {"a": np.arange(3), "s": np.float32(0.5)}
    assert main(["tasks", "result", *NODES, "abc123", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"a": [0, 1, 2], "s": 0.5}

    for error in (
        TaskFailed("task abc123 failed (retries_exhausted): builtins.ValueError: boom"),
        TaskCancelled("task abc123 was cancelled"),
        FarmError("task abc123 is running"),
    ):
        farm.raises = error
        assert main(["tasks", "result", *NODES, "abc123"]) == 1
        assert capsys.readouterr().err == f"supervise tasks result: {error}\n"
    farm.raises = TimeoutError()
    assert main(["tasks", "result", *NODES, "abc123", "--wait", "--timeout", "2"]) == 1
    assert "did not finish within 2 s" in capsys.readouterr().err
    assert main(["tasks", "result", *NODES, "abc123", "--timeout", "0"]) == 2


@pytest.mark.parametrize(
    ("action", "state"), [("cancel", "cancelled"), ("pause", "paused"), ("resume", "pending")]
)
def test_controls(
    farm: FakeFarm, capsys: pytest.CaptureFixture[str], action: str, state: str
) -> None:
    assert main(["tasks", action, *NODES, "abc123"]) == 0
    assert capsys.readouterr().out == f"task abc123: {state}\n"
    assert farm.calls[-1] == (action, ("abc123",), {})
    assert main(["tasks", action, *NODES, "abc123", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == state


def test_the_real_client_is_built_from_the_flags() -> None:
    from supervise.cli import build_parser
    from supervise.tasks.farm import Farm

    args = build_parser().parse_args(
        ["tasks", "list", *NODES, "--store", "etcd://h:2379", "--job", "j", "--curve-keys", "/k"]
    )
    made = cli_tasks.open_farm(args)
    assert isinstance(made, Farm)
    assert (made.store, made.job) == ("etcd://h:2379", "j")
