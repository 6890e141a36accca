"""Resources, sizes, labels and the machine's capacity: exact arithmetic, one-line errors
naming the bad input, detection from cgroups / meminfo / NVML / nvidia-smi, overrides win."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from supervise._validation import InvalidValue
from supervise.tasks import resources as res
from supervise.tasks.resources import Resources, machine_capacity, parse_labels, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * 10**6),
        ("512Mi", 512 << 20),
        ("4GiB", 4 << 30),
        ("1.5G", 1_500_000_000),
        ("1.5Gi", 3 << 29),
        ("0", 0),
        (0, 0),
        (1234, 1234),
        ("10 kb", 10_000),
        ("10 KiB", 10 << 10),
        ("2Ti", 2 << 40),
        ("100B", 100),
        ("3mib", 3 << 20),
        ("2MB", 2 * 10**6),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "abc", "-1G", "4X", "1.5", "1ib", "1i", "4 G B", "1.5Ki0", -5, 1.5, None]
)
def test_parse_size_refuses_in_one_line_naming_the_input(bad: object) -> None:
    with pytest.raises(InvalidValue) as err:
        parse_size(bad, "--memory")  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--memory = {bad!r}")


def test_resources_validate_and_add_exactly() -> None:
    assert Resources(0.1) + Resources(0.2) == Resources(0.3)
    total = Resources(0)
    for _ in range(10):
        total = total + Resources(0.1)
    assert total.fits_in(Resources(1.0)) and Resources(1.0).fits_in(total)
    assert Resources(1, 5, 1) - Resources(2, 7, 0) == Resources(0, 0, 1)  # never negative
    for bad in ({"cpu": -1}, {"cpu": float("inf")}, {"memory": -1}, {"gpus": 1.5}, {"cpu": True}):
        with pytest.raises(InvalidValue) as err:
            Resources(**bad)  # type: ignore[arg-type]
        assert "\n" not in str(err.value) and next(iter(bad)) in str(err.value)


def test_format_size_reads_back() -> None:
    for n in (0, 7, 1000, 1024, 4 << 30, 4 * 10**9, 1536 << 20, 512 * 10**6):
        assert parse_size(res.format_size(n)) == n
    assert [res.format_size(n) for n in (4 << 30, 4 * 10**9, 1536 << 20)] == [
        "4GiB",
        "4GB",
        "1536MiB",
    ]


def test_resources_json_round_trip_and_refusals() -> None:
    r = Resources(2.5, 3 << 30, 1)
    assert Resources.from_json(r.to_json()) == r
    with pytest.raises(InvalidValue, match="unknown keys"):
        Resources.from_json({"cpu": 1, "disk": 3})
    with pytest.raises(InvalidValue, match="mapping"):
        Resources.from_json([1, 2])  # type: ignore[arg-type]
    assert str(r) == "2.5 cpu, 3GiB memory, 1 gpus"


def test_parse_labels() -> None:
    assert parse_labels(["zone=a", "gpu=a100", "zone=a"]) == {"zone=a", "gpu=a100"}
    for bad in (["zone"], ["=a"], ["zone="], ["zone=a", "zone=b"], ["a b=c"]):
        with pytest.raises(InvalidValue) as err:
            parse_labels(bad)
        assert "\n" not in str(err.value) and str(err.value).startswith("label = ")


def test_overrides_win_and_are_checked() -> None:
    cap = machine_capacity(cpus=3.5, memory="2Gi", gpus=2)
    assert cap == Resources(3.5, 2 << 30, 2)
    for kw in ({"cpus": -1}, {"memory": "lots"}, {"gpus": -2}, {"gpus": 1.5}):
        with pytest.raises(InvalidValue) as err:
            machine_capacity(**kw)  # type: ignore[arg-type]
        assert next(iter(kw)) in str(err.value)


def test_detected_capacity_is_this_process_affinity() -> None:
    import os

    cap = machine_capacity(gpus=0)
    assert cap.cpu == len(os.sched_getaffinity(0))
    assert cap.memory > 0


def test_memory_takes_the_lowest_cgroup_limit(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal:       16384 kB\nMemFree: 1 kB\n")
    root = tmp_path / "cgroup"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "memory.max").write_text("8192\n")
    (root / "a" / "b" / "memory.max").write_text("max\n")
    (proc / "self" / "cgroup").write_text("0::/a/b\n")
    assert res._detect_memory(proc, root) == 8192  # the parent's limit binds
    (root / "a" / "memory.max").write_text("max\n")
    assert res._detect_memory(proc, root) == 16384 << 10  # no limit: MemTotal
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("4096\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(1 << 63) + "\n")
    (proc / "self" / "cgroup").write_text("5:cpu,cpuacct:/job\n4:memory:/job\n")
    assert res._detect_memory(proc, v1) == 4096


def test_gpus_from_nvml_else_nvidia_smi_else_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not importable
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine_capacity().gpus == 0
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: x)'\necho 'GPU 1: H100 (UUID: y)'\n")
    smi.chmod(0o755)
    assert machine_capacity().gpus == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert machine_capacity().gpus == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 8  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert machine_capacity().gpus == 8  # NVML first

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver  # type: ignore[attr-defined]
    assert machine_capacity().gpus == 2  # NVML unusable: nvidia-smi
    assert machine_capacity(gpus=0).gpus == 0  # the override wins
