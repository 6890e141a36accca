"""`supervise policy check` / `show`: exit 0 or 2, one line per problem, never a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import supervise as sv
from supervise.cli import main

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(str(p) for p in (ROOT / "policies").glob("*.toml"))


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_check_accepts_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = cli(capsys, "policy", "check", *PRESETS)
    assert status == 0, out + err
    assert out.splitlines() == [f"{p}: ok" for p in PRESETS]
    assert err == ""


def test_check_reports_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[snapshot]\nevry_steps = 5\n[recovery.backoff]\ninitial = "5s"\nmax = "1s"\n')
    status, out, _ = cli(capsys, "policy", "check", PRESETS[0], str(bad))
    assert status == 2
    assert out.splitlines() == [
        f"{PRESETS[0]}: ok",
        f"{bad}: snapshot.evry_steps = 5: unknown key; did you mean 'snapshot.every_steps'?",
        f'{bad}: recovery.backoff.max = "1s": must be >= initial (5 s)',
    ]


def test_check_quiet_prints_problems_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "policy", "check", "-q", *PRESETS) == (0, "", "")
    status, out, _ = cli(capsys, "policy", "check", "-q", str(tmp_path / "nope.toml"))
    assert (status, out) == (2, f"{tmp_path / 'nope.toml'}: no such file\n")


def test_show_prints_normalized_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "p.toml"
    file.write_text('[snapshot]\nevery_steps = 3\n[recovery]\nheartbeat_timeout = "2m"\n')
    status, out, err = cli(capsys, "policy", "show", str(file))
    assert (status, err) == (0, "")
    assert out.startswith(f"# supervise policy: normalized from {file}\n")
    expected = sv.Policy.from_toml(file)
    assert tomllib.loads(out) == expected.to_dict()
    assert "heartbeat_timeout = 120.0\n" in out
    assert "[recovery.backoff]\n" in out


def test_show_without_a_file_prints_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cli(capsys, "policy", "show")
    assert status == 0
    assert sv.Policy.from_toml_text(out) == sv.Policy.default()


def test_show_of_a_bad_file_exits_2_with_problems_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "p.toml"
    file.write_text("[persist]\nkeep = 0\n")
    status, out, err = cli(capsys, "policy", "show", str(file))
    assert (status, out) == (2, "")
    assert err == f"{file}: persist.keep = 0: must be an integer >= 1\n"


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"[persist]\nkeep = 0\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    status, out, _ = cli(capsys, "policy", "check", "-")
    assert (status, out) == (2, "<stdin>: persist.keep = 0: must be an integer >= 1\n")


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        ((), 2),
        (("policy",), 2),
        (("policy", "check"), 2),
        (("policy", "frobnicate"), 2),
        (("nonsense",), 2),
        (("--help",), 0),
        (("policy", "check", "--help"), 0),
        (("--version",), 0),
    ],
)
def test_usage(argv: tuple[str, ...], status: int, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, *argv)
    assert code == status
    assert "Traceback" not in out + err
    assert (out + err).strip()


def _check_file(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status, out, err = cli(capsys, "policy", "check", str(path))
    assert status in (0, 2)
    assert err == ""
    assert "Traceback" not in out
    lines = out.splitlines()
    assert lines and all(line.startswith(f"{path}") for line in lines)
    return status, out


def test_unreadable_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_bytes(b"")
    assert _check_file(empty, capsys) == (0, f"{empty}: ok\n")
    assert _check_file(tmp_path, capsys)[0] == 2  # a directory
    assert _check_file(tmp_path / "missing.toml", capsys)[0] == 2
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    assert _check_file(binary, capsys)[0] == 2
    nul = tmp_path / "nul.toml"
    nul.write_bytes(b"\x00" * 100)
    assert _check_file(nul, capsys)[0] == 2
    if os.getuid() != 0:  # root reads anything
        locked = tmp_path / "locked.toml"
        locked.write_text("")
        locked.chmod(0)
        assert _check_file(locked, capsys) == (2, f"{locked}: permission denied\n")
    if Path("/dev/zero").exists():
        status, out = _check_file(Path("/dev/zero"), capsys)
        assert (status, out) == (2, "/dev/zero: too large for a policy file (more than 1 MiB)\n")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes
) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    _check_file(path, capsys)


toml_values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(),
        st.text(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)
known_keys = st.sampled_from(
    ["snapshot", "recovery", "backoff", "every_steps", "max", "milestones", "memory_budget", "x"]
)
policy_like = st.dictionaries(
    st.sampled_from(
        [
            "supervision",
            "snapshot",
            "retention",
            "replication",
            "persist",
            "recovery",
            "cluster",
            "other",
        ]
    ),
    st.one_of(toml_values, st.dictionaries(known_keys, toml_values, max_size=4)),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(policy_like)
def test_arbitrary_data_gives_a_policy_or_a_policy_error(data: dict) -> None:
    try:
        policy = sv.Policy.from_dict(data)
    except sv.PolicyError as e:
        assert e.problems
        assert all("\n" not in str(p) for p in e.problems)
    else:
        assert sv.Policy.from_dict(policy.to_dict()) == policy


def test_console_script_runs_without_traceback(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.toml"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    command = [sys.executable, "-m", "supervise", "policy", "check", str(garbage), *PRESETS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == f"{garbage}:1: not a UTF-8 text file (byte 0x89)"
