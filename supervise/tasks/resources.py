"""Resources a task needs and a node offers (cpu cores, memory bytes, gpus), sizes and labels.

STAND-IN written on branch `farm` with the FARM_API.md signatures; the `sched` engineer owns
this module and the lead keeps their version at merge.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from supervise._validation import InvalidValue, number

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


@attrs.frozen(slots=True)
class Resources:
    """Cores (fractions allowed), memory bytes and GPUs."""

    cpu: float = attrs.field(default=1.0, validator=number(ge=0))
    memory: int = attrs.field(default=0, validator=number(ge=0, integer=True))
    gpus: int = attrs.field(default=0, validator=number(ge=0, integer=True))

    def fits_in(self, free: Resources) -> bool:
        """Whether these needs fit in ``free``."""
        return self.cpu <= free.cpu + 1e-9 and self.memory <= free.memory and self.gpus <= free.gpus

    def __add__(self, o: Resources) -> Resources:
        return Resources(self.cpu + o.cpu, self.memory + o.memory, self.gpus + o.gpus)

    def __sub__(self, o: Resources) -> Resources:
        return Resources(
            max(0.0, self.cpu - o.cpu), max(0, self.memory - o.memory), max(0, self.gpus - o.gpus)
        )

    def to_json(self) -> dict[str, float | int]:
        return {"cpu": self.cpu, "memory": self.memory, "gpus": self.gpus}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Resources:
        return cls(float(d.get("cpu", 1.0)), int(d.get("memory", 0)), int(d.get("gpus", 0)))


def parse_size(text: str | int, name: str = "memory") -> int:
    """``"512M"``, ``"4GiB"``, ``"1.5G"``, ``0`` -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidValue(name, text, "must be a size >= 0")
        return text
    m = _SIZE.match(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidValue(name, text, "must be a size such as 512M, 4GiB or 1.5G")
    value, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    base = 1024 ** ("kmgt".index(unit) + 1) if binary and unit else _UNITS[unit]
    return int(value * base)


def parse_labels(items: Iterable[str]) -> frozenset[str]:
    """``k=v`` strings, validated."""
    out = set()
    for item in items:
        k, sep, v = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not k or not v:
            raise InvalidValue("label", item, "must be key=value")
        out.add(item)
    return frozenset(out)


def machine_capacity(
    *, cpus: float | None = None, memory: int | None = None, gpus: int | None = None
) -> Resources:
    """This machine's cores, RAM and GPUs; overrides win."""
    if cpus is None:
        cpus = float(len(os.sched_getaffinity(0)))
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Resources(float(cpus), memory, 0 if gpus is None else gpus)
