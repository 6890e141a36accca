"""What a task needs and a farm node offers: cores, memory, GPUs (`Resources`), labels, and the
capacity this machine has (detected, each part overridable).

CPU is kept in thousandths of a core (as Kubernetes' millicores), so sums and differences are
exact and the scheduler can never over-commit a node through float rounding.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

import attrs

from supervise._validation import InvalidValue, number

__all__ = ["Resources", "machine_capacity", "parse_labels", "parse_size"]

MILLI: Final = 1000
"""CPU granularity: a need of 0.0004 cores is 0 cores, 0.0005 is a thousandth."""

_NO_LIMIT: Final = 1 << 60  # cgroup v1 writes ~2**63 for "no limit"
_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_SIZE_SCALE: Final = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE_HELP: Final = (
    "must be bytes or a size like '512M', '4GiB', '1.5G' (K, M, G, T, P: powers of 1000;"
    " Ki, Mi, Gi, Ti, Pi: of 1024)"
)
_LABEL_KEY: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*")
_LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9_.\-:/]+")


def _cpu(value: Any) -> float:
    """Converter: a finite number of cores >= 0, rounded to thousandths."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidValue("cpu", value, "must be a finite number of cores >= 0")
    if value < 0:
        raise InvalidValue("cpu", value, "must be a finite number of cores >= 0")
    return round(value * MILLI) / MILLI


@attrs.frozen(slots=True)
class Resources:
    """An amount of cores (fractions allowed), memory bytes and GPUs; each >= 0."""

    cpu: float = attrs.field(default=1.0, converter=_cpu)
    memory: int = attrs.field(default=0, validator=number(ge=0, integer=True))
    gpus: int = attrs.field(default=0, validator=number(ge=0, integer=True))

    @property
    def millicpu(self) -> int:
        """The cores in thousandths (exact)."""
        return round(self.cpu * MILLI)

    def fits_in(self, free: Resources) -> bool:
        """Whether this need fits in ``free`` in every dimension."""
        return (
            self.millicpu <= free.millicpu and self.memory <= free.memory and self.gpus <= free.gpus
        )

    def __add__(self, o: Resources) -> Resources:
        if not isinstance(o, Resources):
            return NotImplemented
        return _checked(
            (self.millicpu + o.millicpu) / MILLI, self.memory + o.memory, self.gpus + o.gpus
        )

    def __sub__(self, o: Resources) -> Resources:
        """What is left of this after ``o``; never negative (an over-committed dimension has
        nothing left)."""
        if not isinstance(o, Resources):
            return NotImplemented
        return _checked(
            max(0, self.millicpu - o.millicpu) / MILLI,
            max(0, self.memory - o.memory),
            max(0, self.gpus - o.gpus),
        )

    def to_json(self) -> dict[str, float | int]:
        """``{"cpu": ..., "memory": ..., "gpus": ...}`` (what `from_json` reads)."""
        return {"cpu": self.cpu, "memory": self.memory, "gpus": self.gpus}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Resources:
        """The resources `to_json` wrote; a one-line `InvalidValue` for anything else."""
        if not isinstance(d, Mapping):
            raise InvalidValue("resources", d, "must be a mapping with cpu, memory, gpus")
        unknown = set(d) - {"cpu", "memory", "gpus"}
        if unknown:
            raise InvalidValue("resources", d, f"unknown keys {sorted(map(str, unknown))}")
        return cls(d.get("cpu", 1.0), d.get("memory", 0), d.get("gpus", 0))

    def __str__(self) -> str:
        return f"{self.cpu:g} cpu, {format_size(self.memory)} memory, {self.gpus} gpus"


def _checked(cpu: float, memory: int, gpus: int) -> Resources:
    """A `Resources` from parts already valid (sums and differences of valid ones): the
    coordinator adds up every running task's needs each round, and validating each partial
    sum again was most of its CPU time per task."""
    r = object.__new__(Resources)
    object.__setattr__(r, "cpu", cpu)
    object.__setattr__(r, "memory", memory)
    object.__setattr__(r, "gpus", gpus)
    return r


_FORMAT_UNITS: Final = tuple(
    sorted(
        [(1024**e, f"{p}iB") for e, p in enumerate("KMGTP", 1)]
        + [(1000**e, f"{p}B") for e, p in enumerate("kMGTP", 1)],
        reverse=True,
    )
)


def format_size(nbytes: int) -> str:
    """Bytes in the largest unit, binary or decimal, that holds them exactly (``4GiB``,
    ``512MB``, ``1536MiB``, ``0B``): what `parse_size` reads back to the same number."""
    for scale, unit in _FORMAT_UNITS:
        if nbytes and nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def parse_size(text: str | int, name: str = "memory") -> int:
    """Bytes from an int or ``"512M"``, ``"4GiB"``, ``"1.5G"``, ``"0"``: K, M, G, T, P are
    powers of 1000 and Ki, Mi, Gi, Ti, Pi powers of 1024 (as Kubernetes reads them; a trailing
    ``B`` and any case are accepted: ``4gib``, ``512MB``); a one-line `InvalidValue` naming
    ``name`` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise InvalidValue(name, text, "must not be negative")
        return text
    if not isinstance(text, str):
        raise InvalidValue(name, text, _SIZE_HELP)
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise InvalidValue(name, text, _SIZE_HELP)
    given = match[2].lower()
    unit = "" if given in ("b", "byte", "bytes") else given
    if len(unit) > 1:
        unit = unit.removesuffix("b") or "?"
    binary = len(unit) == 2 and unit.endswith("i")
    unit = unit.removesuffix("i") if binary else unit
    if unit not in _SIZE_SCALE:
        raise InvalidValue(name, text, f"unknown unit {match[2]!r}: {_SIZE_HELP}")
    nbytes = Fraction(match[1]) * (1024 if binary else 1000) ** _SIZE_SCALE[unit]
    if nbytes.denominator != 1:
        raise InvalidValue(name, text, "is not a whole number of bytes")
    return int(nbytes)


def parse_labels(items: Iterable[str]) -> frozenset[str]:
    """Validated ``key=value`` labels (a key given twice with two values is refused)."""
    if isinstance(items, str):
        items = [items]
    seen: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise InvalidValue("label", item, "must be key=value")
        key, value = item.split("=", 1)
        if not _LABEL_KEY.fullmatch(key):
            raise InvalidValue("label", item, "key must be letters, digits and _.-/")
        if not _LABEL_VALUE.fullmatch(value):
            raise InvalidValue("label", item, "value must be non-empty letters, digits and _.-:/")
        if seen.get(key, value) != value:
            raise InvalidValue("label", item, f"key {key!r} is also given as {seen[key]!r}")
        seen[key] = value
    return frozenset(f"{k}={v}" for k, v in seen.items())


# --- capacity of this machine -----------------------------------------------------------------


def machine_capacity(
    *, cpus: float | None = None, memory: int | str | None = None, gpus: int | None = None
) -> Resources:
    """This machine's capacity: the cores this process may run on (``sched_getaffinity``),
    memory (the cgroup limit when lower than MemTotal), GPUs (NVML when importable, else
    ``nvidia-smi -L``, else 0; at most as many as ``CUDA_VISIBLE_DEVICES`` lists). Each
    override, when given, wins (and is validated: one-line `InvalidValue`)."""
    return Resources(
        _detect_cpus() if cpus is None else _override_cpus(cpus),
        _detect_memory() if memory is None else parse_size(memory, "memory"),
        _detect_gpus() if gpus is None else _override_gpus(gpus),
    )


def _override_cpus(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidValue("cpus", value, "must be a finite number of cores >= 0")
    if value < 0:
        raise InvalidValue("cpus", value, "must be a finite number of cores >= 0")
    return float(value)


def _override_gpus(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidValue("gpus", value, "must be an integer >= 0")
    return value


def _detect_cpus() -> float:
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return float(len(affinity(0)))
    return float(os.cpu_count() or 1)


def _detect_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    total = _mem_total(proc / "meminfo")
    limit = _cgroup_limit(proc / "self" / "cgroup", cgroup_root)
    candidates = [v for v in (total, limit) if v is not None]
    return min(candidates) if candidates else 0


def _mem_total(meminfo: Path) -> int | None:
    """MemTotal of /proc/meminfo in bytes (None when unreadable)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                fields = line.split()
                scale = 1024 if len(fields) > 2 and fields[2].lower() == "kb" else 1
                return int(fields[1]) * scale
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit(self_cgroup: Path, root: Path) -> int | None:
    """The lowest memory limit on this process's cgroup path (v2 ``memory.max``, or v1
    ``memory.limit_in_bytes``), or None when there is none."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 unified hierarchy
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            value = _read_limit(here / name)
            if value is not None:
                limits.append(value)
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(limits) if limits else None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max"
        return None
    value = int(text)
    return None if value >= _NO_LIMIT else value


def _detect_gpus() -> int:
    found = _nvml_count()
    if found is None:
        found = _nvidia_smi_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        found = min(found, len([d for d in visible.split(",") if d.strip()]))
    return found


def _nvml_count() -> int | None:
    """GPUs NVML sees (``pynvml`` / ``nvidia-ml-py``), or None when NVML is not usable."""
    try:
        import pynvml  # type: ignore[import-not-found]  # optional: nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError: no driver, no library
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvidia_smi_count() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 without nvidia-smi, or when it fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
