"""`TaskSpec`: what to run (``MODULE:FUNC`` and its arguments) and under which policy; checked
at construction, so a bad target or an argument the codec cannot carry fails at submit time."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import msgpack

from supervise._validation import InvalidValue, instance_of
from supervise.snapshot.persist import check_job
from supervise.tasks.attempt import check_target
from supervise.tasks.journal import CorruptRecord, seal, unseal, write_atomic
from supervise.tasks.policy import TaskPolicy, checkpoint_from_dict, checkpoint_to_dict
from supervise.tasks.values import decode, encode


def _task_id(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    # a task id names directories and arenas: the job-name rule (no '.', '..', '/', no leading dot)
    try:
        check_job(value)
    except ValueError as e:
        raise InvalidValue(attr.name, value, str(e).split(": ", 1)[1]) from None


def _kwargs(_inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    for key in value:
        if not isinstance(key, str) or not key.isidentifier():
            raise InvalidValue(attr.name, value, f"key {key!r} is not a keyword argument name")


def _new_id() -> str:
    return uuid.uuid4().hex[:16]


@attrs.frozen(slots=True)
class TaskSpec:
    """A task: ``target`` (``module:function``, an async function taking a `TaskContext`
    first), its ``args``/``kwargs`` (task values), its id and its policy."""

    target: str = attrs.field(converter=check_target)
    args: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    kwargs: Mapping[str, Any] = attrs.field(factory=dict, converter=dict, validator=_kwargs)
    task_id: str = attrs.field(factory=_new_id, validator=_task_id)
    policy: TaskPolicy = attrs.field(factory=TaskPolicy, validator=instance_of(TaskPolicy))

    def __attrs_post_init__(self) -> None:
        encode(list(self.args), "args")
        encode(dict(self.kwargs), "kwargs")

    def to_bytes(self) -> bytes:
        """What a worker process needs to run an attempt (the retry policy stays home)."""
        payload: bytes = msgpack.packb(
            {
                "task_id": self.task_id,
                "target": self.target,
                "args": encode(list(self.args), "args"),
                "kwargs": encode(dict(self.kwargs), "kwargs"),
                "checkpoint": checkpoint_to_dict(self.policy.checkpoint),
            },
            use_bin_type=True,
        )
        return seal(payload)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "task spec") -> TaskSpec:
        """The spec `to_bytes` wrote (its retry policy is the default)."""
        try:
            d = msgpack.unpackb(unseal(data, name), raw=False)
            return cls(
                d["target"],
                tuple(decode(d["args"])),
                decode(d["kwargs"]),
                d["task_id"],
                TaskPolicy(checkpoint=checkpoint_from_dict(d["checkpoint"])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptRecord(f"{name}: {e}") from None

    def save(self, path: Path) -> None:
        """Write the spec to ``path`` atomically."""
        write_atomic(path, self.to_bytes())
