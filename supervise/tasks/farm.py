"""The farm's Python client (DESIGN §9): submit tasks to a farm of ``supervise node --tasks``
agents, follow them, get their results.

``async with Farm(nodes="h:7000,h:7001") as farm: ref = await farm.submit("stages:pipeline",
"data.csv", cpu=1); await ref.result()``. Any farm node answers: one that is not the
coordinator redirects to it, and while a new coordinator takes over the client asks again until
``timeout``. Bad input (target, arguments, sizes) is refused before anything is sent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import attrs
import msgpack
import trio

from supervise._validation import InvalidValue
from supervise.cluster.errors import ClusterError
from supervise.tasks.farm_messages import (
    KINDS,
    MAX_SPEC_BYTES,
    Control,
    ControlAction,
    FarmRefusal,
    Query,
    ResultQuery,
    ResultReply,
    Submit,
    TaskList,
    TaskReply,
)
from supervise.tasks.policy import RetryPolicy, TaskPolicy
from supervise.tasks.resources import Resources, parse_labels, parse_size
from supervise.tasks.runner import TaskFailed
from supervise.tasks.spec import TaskSpec
from supervise.tasks.states import Reason, TaskState, Transition
from supervise.tasks.values import decode

__all__ = ["Farm", "FarmError", "TaskCancelled", "TaskInfo", "TaskRef", "Unschedulable"]

#: The environment variable `Farm` reads its nodes from when given none.
NODES_ENV = "SUPERVISE_NODES"
_POLL_FIRST = 0.05
_POLL_MAX = 1.0
RESULT_HOLD_S = 1.0
"""How long the coordinator may hold a result query for its task to end (at most a quarter
of the client's timeout): the answer comes when the task ends, not at the next poll."""
REQUEST_MIN_S = 2.0
"""The least one request waits for its answer before the client asks again or another node;
at most it waits half the time left (a node that never answers leaves time to ask others)."""


_INLINE_SPEC = 16 * 1024
"""A spec up to this size travels in the message header (64 KiB at most); larger, as payload."""


def _tasks(got: Any) -> list[dict[str, Any]]:
    """The tasks of a `TaskList` reply: in its header and its payload (a packed list)."""
    body = got.body
    if not isinstance(body, TaskList):
        raise FarmError(f"unexpected answer {type(body).__name__}")
    tasks = list(body.tasks)
    for buf in got.buffers:  # a long list: packed lists, one per payload frame
        tasks.extend(msgpack.unpackb(buf, raw=False))
    return tasks


class FarmError(RuntimeError):
    """The farm refused a request, or could not be reached (one line)."""


class Unschedulable(FarmError):
    """No node of the farm can ever satisfy the task's resources."""


class TaskCancelled(FarmError):
    """The task was cancelled: it has no result."""


@attrs.frozen(slots=True)
class TaskInfo:
    """A task as the coordinator sees it."""

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
    submitted: float  # wall-clock unix seconds
    updated: float
    history: tuple[Transition, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain data (``supervise tasks show --json``)."""
        return {
            "id": self.id,
            "state": str(self.state),
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
                    "source": None if t.source is None else str(t.source),
                    "target": str(t.target),
                    "reason": str(t.reason),
                    "at": t.at,
                    "detail": t.detail,
                    "wall_time": t.wall_time,
                }
                for t in self.history
            ],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TaskInfo:
        """The info a coordinator sent (``record_json``)."""
        return cls(
            id=d["id"],
            state=TaskState(d["state"]),
            node=d["node"],
            attempt=d["attempt"],
            progress=d["progress"],
            target=d["target"],
            priority=d["priority"],
            needs=Resources.from_json(d["needs"]),
            reason=d["reason"],
            error=d["error"],
            submitted=d["submitted"],
            updated=d["updated"],
            history=tuple(
                Transition(
                    h["source"],
                    h["target"],
                    Reason(h["reason"]),
                    h["at"],
                    h["detail"],
                    h["wall_time"],
                )
                for h in d.get("history", ())
            ),
        )


class TaskRef:
    """A submitted task, by id, on its farm."""

    __slots__ = ("_farm", "task_id")

    def __init__(self, farm: Farm, task_id: str) -> None:
        self._farm = farm
        self.task_id = task_id

    def __repr__(self) -> str:
        return f"TaskRef({self.task_id!r})"

    async def result(self, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait for the task's return value; TaskFailed, TaskCancelled or TimeoutError."""
        return await self._farm.result(self.task_id, timeout=timeout)

    async def show(self) -> TaskInfo:
        return await self._farm.show(self.task_id)

    async def cancel(self) -> TaskInfo:
        return await self._farm.cancel(self.task_id)

    async def pause(self) -> TaskInfo:
        return await self._farm.pause(self.task_id)

    async def resume(self) -> TaskInfo:
        return await self._farm.resume(self.task_id)


def _peers(nodes: str | Sequence[str] | Mapping[int, str] | None) -> dict[int, str]:
    if nodes is None:
        nodes = os.environ.get(NODES_ENV) or None
        if nodes is None:
            raise FarmError(f"no farm nodes: pass nodes='host:port,...' or set {NODES_ENV}")
    if isinstance(nodes, Mapping):
        peers = dict(nodes)
    else:
        items = nodes.split(",") if isinstance(nodes, str) else list(nodes)
        peers = {i: n.strip() for i, n in enumerate(items) if n.strip()}
    if not peers:
        raise FarmError("no farm nodes: the list is empty")
    return peers


class Farm:
    """A client of a farm (see the module doc); use it as ``async with``."""

    def __init__(
        self,
        nodes: str | Sequence[str] | Mapping[int, str] | None = None,
        *,
        store: str | None = None,
        job: str | None = None,
        curve_keys: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise FarmError(f"timeout = {timeout!r}: must be a number of seconds > 0")
        self._peers = _peers(nodes)
        self.store = store  # the nodes are asked; the store names the leader they redirect to
        self.job = job
        self._curve_keys = curve_keys
        self.timeout = float(timeout)
        self._transport: Any = None
        self._cm: Any = None
        self._guess: int | None = None

    async def __aenter__(self) -> Farm:
        from supervise.cluster import CurveKeys, Transport

        curve = CurveKeys.load(self._curve_keys, "client") if self._curve_keys else None
        self._transport = Transport(rank=None, peers=self._peers, curve=curve, kinds=KINDS)
        self._cm = self._transport.running()
        await self._cm.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cm, self._cm, self._transport = self._cm, None, None
        if cm is not None:
            await cm.__aexit__(exc_type, exc, tb)

    # -- talking to the coordinator --------------------------------------------------------

    async def _call(self, message: object, frames: Sequence[bytes] = ()) -> Any:
        """Ask the coordinator (found by asking nodes, following redirects, trying again
        while a new one takes over, up to ``timeout``); its answer, or FarmError. A request
        waits for its answer up to half the time left (at least `REQUEST_MIN_S`): a loaded
        coordinator answers late, and asking again would only add to its load. Asking
        again is safe: a submit is idempotent by task id (the same spec each time)."""
        if self._transport is None:
            raise FarmError("use the farm as 'async with Farm(...) as farm:'")
        deadline = trio.current_time() + self.timeout
        order = sorted(self._peers)
        last = "no node answered"
        i = 0
        wait = _POLL_FIRST
        while True:
            left = deadline - trio.current_time()
            if left <= 0:
                raise FarmError(f"the farm did not answer within {self.timeout:g}s: {last}")
            peer = self._guess if self._guess is not None else order[i % len(order)]
            try:
                got = await self._transport.request(
                    peer, message, list(frames), timeout=min(left, max(REQUEST_MIN_S, left / 2))
                )
            except ClusterError as exc:
                last = f"rank {peer}: {exc}"
                self._guess = None
                i += 1
                continue
            body = got.body
            if not isinstance(body, FarmRefusal):
                self._guess = peer
                return got
            if body.unschedulable:
                raise Unschedulable(body.reason)
            if body.unknown or (body.coordinator == peer):
                raise FarmError(body.reason)
            last = body.reason
            if body.coordinator is not None and body.coordinator in self._peers:
                self._guess = body.coordinator
                if body.coordinator != peer:
                    continue
            self._guess = None
            i += 1
            await trio.sleep(min(wait, max(0.0, left)))  # a takeover under way: ask again
            wait = min(wait * 2, _POLL_MAX)

    async def _info(self, message: object, frames: Sequence[bytes] = ()) -> TaskInfo:
        got = await self._call(message, frames)
        if isinstance(got.body, TaskReply):
            return TaskInfo.from_json(got.body.info)
        tasks = _tasks(got)
        if tasks:
            return TaskInfo.from_json(tasks[0])
        raise FarmError(f"unexpected answer {type(got.body).__name__}")

    # -- the API ---------------------------------------------------------------------------

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
        """Queue ``target(ctx, *args, **kwargs)`` on the farm; its `TaskRef`. The target,
        the arguments and the resources are checked here (one-line errors); resources no
        node can ever satisfy raise `Unschedulable`."""
        retry = RetryPolicy(max_attempts=max_attempts)
        extra = {} if task_id is None else {"task_id": task_id}
        spec = TaskSpec(target, args, kwargs, policy=TaskPolicy(retry=retry), **extra)
        needs = Resources(cpu, parse_size(memory), gpus)
        data = spec.to_bytes()
        if len(data) > MAX_SPEC_BYTES:
            raise InvalidValue(
                "args",
                f"{len(data)} bytes",
                f"a task's arguments must encode to at most {MAX_SPEC_BYTES // 1024} KiB "
                "(they travel in the assignment): pass large data by path",
            )
        large = len(data) > _INLINE_SPEC  # the header is small: a large spec is the payload
        message = Submit(
            b"" if large else data,
            needs.to_json(),
            sorted(parse_labels(labels)),
            priority,
            max_attempts,
        )
        info = await self._info(message, [data] if large else [])
        return TaskRef(self, info.id)

    def ref(self, task_id: str) -> TaskRef:
        """A reference to a task submitted before (by anyone)."""
        return TaskRef(self, task_id)

    async def list(self) -> list[TaskInfo]:
        """Every task the farm knows, in submission order."""
        return [TaskInfo.from_json(t) for t in _tasks(await self._call(Query()))]

    async def show(self, task_id: str) -> TaskInfo:
        """One task, with its history."""
        return await self._info(Query(task_id, history=True))

    async def result(
        self,
        task_id: str,
        *,
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """The task's return value: waits for it (up to ``timeout``, then TimeoutError);
        ``wait=False`` on an unfinished task raises FarmError. TaskFailed / TaskCancelled
        when it did not complete."""
        limit = math.inf if timeout is None else timeout
        try:
            with trio.fail_after(limit):
                return await self._wait_result(task_id, wait)
        except trio.TooSlowError:
            raise TimeoutError(f"task {task_id} did not finish within {timeout:g}s") from None

    async def _wait_result(self, task_id: str, wait: bool) -> Any:
        pause = _POLL_FIRST
        # the coordinator holds the query until the task ends (well within a request's wait)
        hold = min(RESULT_HOLD_S, self.timeout / 4) if wait else 0.0
        while True:
            asked = trio.current_time()
            got = await self._call(ResultQuery(task_id, hold))
            body = got.body
            if not isinstance(body, ResultReply):
                raise FarmError(f"unexpected answer {type(body).__name__}")
            state = TaskState(body.state)
            if state is TaskState.COMPLETED:
                buffers = got.buffers
                result = bytes(buffers[0]) if buffers else body.result
                return decode(result) if result else None
            if state is TaskState.FAILED:
                raise TaskFailed(f"task {task_id} failed: {body.error}")
            if state is TaskState.CANCELLED:
                raise TaskCancelled(f"task {task_id} was cancelled")
            if not wait:
                raise FarmError(f"task {task_id} is {state}")
            if trio.current_time() - asked >= hold / 2:
                continue  # held as asked: ask again at once
            await trio.sleep(pause)  # answered early (a node refusing, taking over)
            pause = min(pause * 1.5, _POLL_MAX)

    async def cancel(self, task_id: str) -> TaskInfo:
        """Stop the task for good."""
        return await self._info(Control(task_id, ControlAction.CANCEL))

    async def pause(self, task_id: str) -> TaskInfo:
        """Checkpoint and stop the task; `resume` goes on from there."""
        return await self._info(Control(task_id, ControlAction.PAUSE))

    async def resume(self, task_id: str) -> TaskInfo:
        """Queue a paused task again."""
        return await self._info(Control(task_id, ControlAction.RESUME))
