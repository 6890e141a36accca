"""What ``Snapshotter(extra=...)`` accepts, each turned into a `Stateful` for capture and
restore: objects with ``state_dict()``/``load_state_dict()`` as they are, torch's
``DistributedSampler`` by its epoch, and a dict of plain values (updated in place on restore).

Anything else is a one-line error naming the entry: an immutable value (an int, a str) has
nowhere to go back to on restore, and nothing is ever pickled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.utils.data

from supervise.torch._state import Stateful

#: What one ``extra`` entry may be (checked at construction; see `adapt`).
Extra = Stateful | torch.utils.data.DistributedSampler[Any] | dict[str, Any]

ACCEPTED = (
    "an object with state_dict()/load_state_dict(), a DistributedSampler, or a dict of plain values"
)


class SamplerEpoch:
    """A ``DistributedSampler``'s state: its epoch (``set_epoch``), the only thing that changes
    after construction (its seed, shuffle and rank split come from the constructor)."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler[Any]) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": int(self.sampler.epoch)}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        self.sampler.set_epoch(int(state["epoch"]))


class PlainDict:
    """A dict of plain values (numbers, strings, lists, dicts of them, tensors): captured as a
    copy, restored by replacing its contents in place (the caller keeps the same dict)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def state_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        self.values.clear()
        self.values.update(state)


def adapt(name: str, obj: object) -> Stateful:
    """The `Stateful` that captures and restores ``extra[name]``; TypeError when it cannot."""
    if callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    ):
        return obj  # type: ignore[return-value]
    if isinstance(obj, torch.utils.data.DistributedSampler):
        return SamplerEpoch(obj)
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"extra[{name!r}]: dict key {key!r} must be a string")
        return PlainDict(obj)
    raise TypeError(
        f"extra[{name!r}] ({type(obj).__name__}) has no state_dict()/load_state_dict(); "
        f"extra takes {ACCEPTED}"
    )
