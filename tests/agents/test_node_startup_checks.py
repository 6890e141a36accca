"""``supervise node`` checks every argument and resource before anything starts: each bad one
is one line naming it, exit 2 (not an internal error, not a failure after every recovery
attempt)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from supervise._testing import free_ports
from supervise.agents import preflight
from supervise.agents.config import NodeConfig
from supervise.agents.node import run_node
from supervise.agents.preflight import StartupError, check_startup
from supervise.cli import main
from supervise.policy import Policy
from supervise.snapshot import Layout, Manifest, PersistTier, TensorEntry
from supervise.snapshot.arena import Arena


@pytest.fixture
def port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def node(
    capsys: pytest.CaptureFixture[str], port: int, *args: str, command: tuple[str, ...] = ("true",)
) -> tuple[int, str]:
    """``supervise node`` in-process; its exit status and its stderr."""
    argv = ["node", "--rank", "0", "--nodes", f"127.0.0.1:{port}", *args, "--", *command]
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line(err: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("supervise node: "), err
    for name in names:
        assert name in lines[0], err


def test_a_port_in_use(capsys: pytest.CaptureFixture[str], busy_port: int) -> None:
    code, err = node(capsys, busy_port)
    assert code == 2
    assert_one_line(err, f"127.0.0.1:{busy_port}", "in use")


@pytest.mark.parametrize("bad", ["99999", "0", "65536"])
def test_a_port_out_of_range(capsys: pytest.CaptureFixture[str], bad: str) -> None:
    code, err = node(capsys, int(bad))
    assert code == 2
    assert_one_line(err, "--nodes", f"port {bad} is out of range")


def test_a_peer_port_out_of_range(capsys: pytest.CaptureFixture[str], port: int) -> None:
    code = main(["node", "--rank", "0", "--nodes", f"127.0.0.1:{port},h:70000", "--", "true"])
    assert code == 2
    assert_one_line(capsys.readouterr().err, "h:70000", "out of range")


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_a_worker_shutdown_not_finite_or_negative(
    capsys: pytest.CaptureFixture[str], port: int, bad: str
) -> None:
    code, err = node(capsys, port, "--worker-shutdown", bad)
    assert code == 2
    assert_one_line(err, "--worker-shutdown", "finite number of seconds >= 0")


@pytest.mark.parametrize(("flag", "bad"), [("--rank", "5"), ("--nproc-per-node", "0")])
def test_a_rank_or_process_count_out_of_range(
    capsys: pytest.CaptureFixture[str], port: int, flag: str, bad: str
) -> None:
    argv = ["node", "--rank", "0", "--nodes", f"127.0.0.1:{port}", flag, bad, "--", "true"]
    assert main(argv) == 2
    assert_one_line(capsys.readouterr().err, flag)


def test_a_regular_file_as_shm_dir(
    capsys: pytest.CaptureFixture[str], port: int, tmp_path: Path
) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    code, err = node(capsys, port, "--shm-dir", str(f))
    assert code == 2
    assert_one_line(err, "--shm-dir", str(f), "not a directory")
    code, err = node(capsys, port, "--shm-dir", str(f / "below"))
    assert code == 2
    assert_one_line(err, "--shm-dir", "cannot be created")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_shm_dir(capsys: pytest.CaptureFixture[str], port: int, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    code, err = node(capsys, port, "--shm-dir", str(ro))
    assert code == 2
    assert_one_line(err, "--shm-dir", "not writable")


def test_a_command_that_does_not_exist(capsys: pytest.CaptureFixture[str], port: int) -> None:
    code, err = node(capsys, port, command=("no-such-program-h14", "--flag"))
    assert code == 2
    assert_one_line(err, "command", "no-such-program-h14", "not found on PATH")


def test_a_command_path_that_is_missing_or_not_executable(
    capsys: pytest.CaptureFixture[str], port: int, tmp_path: Path
) -> None:
    code, err = node(capsys, port, command=(str(tmp_path / "train.sh"),))
    assert code == 2
    assert_one_line(err, "command", "train.sh", "does not exist")
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    code, err = node(capsys, port, command=(str(script),))
    assert code == 2
    assert_one_line(err, "command", "train.sh", "not an executable file")


def test_a_python_script_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], port: int, tmp_path: Path
) -> None:
    code, err = node(capsys, port, command=(sys.executable, str(tmp_path / "nope.py")))
    assert code == 2
    assert_one_line(err, "command", "nope.py", "does not exist")


def test_a_persist_path_that_is_a_file(
    capsys: pytest.CaptureFixture[str], port: int, tmp_path: Path
) -> None:
    f = tmp_path / "ckpt"
    f.write_text("x")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[persist]\nevery_snapshots = 1\npath = "{f}"\n')
    code, err = node(capsys, port, "--policy", str(policy), "--job", "j1")
    assert code == 2
    assert_one_line(err, "persist.path", str(f), "not a directory")


def test_a_persist_disk_without_room_for_one_snapshot(
    capsys: pytest.CaptureFixture[str],
    port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = tmp_path / "ckpt"
    layout = Layout.plan([("w", "uint8", (1 << 16,))])
    data = bytes(layout.nbytes)
    tensors = tuple(
        TensorEntry(e.name, e.dtype, e.shape, e.offset, e.nbytes) for e in layout.entries
    )
    manifest = Manifest(
        step=1,
        generation=0,
        rank=0,
        world_size=1,
        nbytes=layout.nbytes,
        tensors=tensors,
        wall_time=0.0,
    )
    PersistTier(ckpt, rank=0, keep=1, job="j1").write(manifest, memoryview(data))
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[persist]\nevery_snapshots = 1\nkeep = 1\npath = "{ckpt}"\n')
    real = os.statvfs(ckpt)

    class Full:
        f_bavail, f_frsize, f_blocks = 1, real.f_frsize, real.f_blocks

    monkeypatch.setattr(preflight.os, "statvfs", lambda _p: Full)
    code, err = node(capsys, port, "--policy", str(policy), "--job", "j1")
    assert code == 2
    assert_one_line(err, "persist.path", str(ckpt), "free", "needs")


def test_good_arguments_pass_every_check(port: int, tmp_path: Path) -> None:
    config = NodeConfig(
        rank=0,
        nodes=[f"127.0.0.1:{port}"],
        command=[Path(sys.executable).name, "-m", "any.module"],  # a module: not looked for
        policy=Policy.from_dict({"persist": {"every_snapshots": 1, "path": str(tmp_path / "c")}}),
        shm_dir=str(tmp_path / "shm-to-be-created"),
        worker_shutdown=0.0,
    )
    check_startup(config, env={"PATH": str(Path(sys.executable).parent)})
    with pytest.raises(StartupError, match="not found on PATH"):
        check_startup(config, env={"PATH": str(tmp_path)})


@pytest.mark.slow
def test_the_real_cli_exits_2_at_once_for_a_missing_command() -> None:
    port = free_ports(1)[0]
    argv = ["--rank", "0", "--nodes", f"127.0.0.1:{port}", "--", "no-such-program-h14"]
    r = subprocess.run(
        [sys.executable, "-m", "supervise", "node", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "supervise node: command: 'no-such-program-h14' is not found on PATH or not executable"
    )


def test_a_port_taken_after_the_checks_is_one_line_and_keeps_the_arenas(
    busy_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "tmp"
    runs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(runs))  # where the run dir goes
    shm = tmp_path / "shm"
    shm.mkdir()
    left = shm / f"supervise-node0-{busy_port}-r00000-0000.arena"  # a previous agent's
    Arena.create(left, data_capacity=4096, n_slots=2).close()
    config = NodeConfig(
        rank=0, nodes=[f"127.0.0.1:{busy_port}"], command=["true"], shm_dir=str(shm)
    )
    with pytest.raises(StartupError, match=f"127.0.0.1:{busy_port}.*Address already in use"):
        trio.run(run_node, config)
    assert [p.name for p in shm.iterdir()] == [left.name]  # kept for the next try; no lock
    assert list(runs.iterdir()) == []  # the run dir went


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "10.1.2.3"])
def test_listening_beyond_loopback_needs_keys(
    capsys: pytest.CaptureFixture[str], port: int, host: str
) -> None:
    argv = ["node", "--rank", "0", "--nodes", f"{host}:{port},127.0.0.1:1", "--", "true"]
    assert main(argv) == 2
    assert_one_line(
        capsys.readouterr().err,
        "replication.curve",
        f"{host}:{port}",
        "beyond loopback",
        "supervise keys generate DIR --nodes 2",
    )


def test_keys_let_an_agent_listen_beyond_loopback(tmp_path: Path, port: int) -> None:
    curve = Policy.from_dict({"replication": {"curve": True, "curve_keys": str(tmp_path)}})
    config = NodeConfig(rank=0, nodes=[f"0.0.0.0:{port}"], command=["true"], policy=curve)
    preflight.check_authenticated(config)  # no error
    for loopback in ("127.0.0.1", "localhost", "[::1]"):
        plain = NodeConfig(rank=0, nodes=[f"{loopback}:{port}"], command=["true"])
        preflight.check_authenticated(plain)
