"""STAND-IN (branch `sched`): the signatures of the `Farm` client agreed in FARM_API.md, so
the CLI can be built and tested against them. The `farm` branch owns this module; at merge
its version replaces this one. Every call that would reach the farm raises `FarmError`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import attrs

from supervise.tasks.resources import Resources
from supervise.tasks.states import TaskState, Transition

__all__ = ["Farm", "FarmError", "TaskCancelled", "TaskInfo", "TaskRef", "Unschedulable"]

_STAND_IN = "the farm client is not built on this branch (stand-in of supervise.tasks.farm)"


class FarmError(RuntimeError):
    """The farm refused a request or could not be reached (one line)."""


class Unschedulable(FarmError):
    """No node can ever satisfy the task's resources or labels."""


class TaskCancelled(FarmError):
    """The task was cancelled: it has no result."""


@attrs.frozen(slots=True)
class TaskInfo:
    """A task as the farm sees it."""

    id: str
    state: TaskState
    node: int | None
    attempt: int
    progress: float
    target: str
    priority: int
    needs: Resources
    reason: str
    error: str | None
    submitted: float
    updated: float
    history: tuple[Transition, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: id, state, node, attempt, progress and the rest."""
        return {
            "id": self.id,
            "state": self.state.value,
            "node": self.node,
            "attempt": self.attempt,
            "progress": self.progress,
            "target": self.target,
            "priority": self.priority,
            "needs": self.needs.to_json(),
            "reason": self.reason,
            "error": self.error,
            "submitted": self.submitted,
            "updated": self.updated,
            "history": [
                {
                    "from": None if t.source is None else t.source.value,
                    "to": t.target.value,
                    "reason": t.reason.value,
                    "time": t.wall_time,
                    "detail": t.detail,
                }
                for t in self.history
            ],
        }


class TaskRef:
    """A submitted task."""

    def __init__(self, farm: Farm, task_id: str) -> None:
        self._farm = farm
        self.task_id = task_id

    async def result(self, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait for the task's return value."""
        return await self._farm.result(self.task_id, wait=True, timeout=timeout)

    async def show(self) -> TaskInfo:
        """The task now."""
        return await self._farm.show(self.task_id)

    async def cancel(self) -> TaskInfo:
        """Stop it for good."""
        return await self._farm.cancel(self.task_id)

    async def pause(self) -> TaskInfo:
        """Checkpoint and stop it until `resume`."""
        return await self._farm.pause(self.task_id)

    async def resume(self) -> TaskInfo:
        """Let a paused task go on."""
        return await self._farm.resume(self.task_id)


class Farm:
    """A client of the farm's coordinator (stand-in: every request raises `FarmError`)."""

    def __init__(
        self,
        nodes: str | Sequence[str] | Mapping[int, str] | None = None,
        *,
        store: str | None = None,
        job: str | None = None,
        curve_keys: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.nodes = nodes
        self.store = store
        self.job = job
        self.curve_keys = curve_keys
        self.timeout = timeout

    async def __aenter__(self) -> Farm:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def submit(
        self,
        target: str,
        *args: Any,
        cpu: float = 1.0,
        memory: int | str = 0,
        gpus: int = 0,
        labels: Iterable[str] = (),
        priority: int = 0,
        max_attempts: int = 3,
        task_id: str | None = None,
        **kwargs: Any,
    ) -> TaskRef:
        """Queue a task; its reference."""
        raise FarmError(_STAND_IN)

    def ref(self, task_id: str) -> TaskRef:
        """A reference to a task submitted earlier."""
        return TaskRef(self, task_id)

    async def list(self) -> list[TaskInfo]:
        """Every task the farm knows."""
        raise FarmError(_STAND_IN)

    async def show(self, task_id: str) -> TaskInfo:
        """One task."""
        raise FarmError(_STAND_IN)

    async def result(
        self,
        task_id: str,
        *,
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """A task's return value."""
        raise FarmError(_STAND_IN)

    async def cancel(self, task_id: str) -> TaskInfo:
        """Cancel a task."""
        raise FarmError(_STAND_IN)

    async def pause(self, task_id: str) -> TaskInfo:
        """Pause a task."""
        raise FarmError(_STAND_IN)

    async def resume(self, task_id: str) -> TaskInfo:
        """Resume a paused task."""
        raise FarmError(_STAND_IN)
