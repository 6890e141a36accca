"""A spare of a rank other than 0 waits for rank 0's rendezvous port before it runs the
training command (torch's store client would back off 250-750 ms after a refused connect)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from supervise import _warm
from supervise._testing.procs import free_port
from supervise.agents.restart import LocalRestart
from supervise.runtime.procfs import tcp_port_met


def _env(port: int, rank: int = 1, **extra: str) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        **extra,
    }


@pytest.fixture
def late_listener() -> Iterator[tuple[int, threading.Event, list[float]]]:
    """A port that starts listening once ``go`` is set; ``accepted`` records when."""
    port = free_port()
    go = threading.Event()
    accepted: list[float] = []
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def serve() -> None:
        go.wait(10)
        srv.bind(("127.0.0.1", port))
        srv.listen()
        srv.settimeout(10)
        with contextlib.suppress(OSError):  # no connection came (the test failed anyway)
            conn, _ = srv.accept()
            accepted.append(time.monotonic())
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield port, go, accepted
    go.set()
    t.join(10)
    srv.close()


def test_a_rank_other_than_0_waits_until_the_master_port_listens(
    late_listener: tuple[int, threading.Event, list[float]],
) -> None:
    port, go, accepted = late_listener
    # refused at first: the master is not listening yet; it starts once the wait is under way
    threading.Timer(0.05, go.set).start()
    assert _warm._await_master(_env(port, SUPERVISE_MASTER_WAIT="10")) is True
    deadline = time.monotonic() + 10
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accepted, "the wait connected to the master once it listened"


def test_the_wait_is_bounded_when_the_master_never_listens() -> None:
    port = free_port()  # nothing listens there
    assert _warm._await_master(_env(port, SUPERVISE_MASTER_WAIT="0.05")) is False


@pytest.mark.parametrize(
    "env",
    [
        _env(1, rank=0),  # rank 0 hosts the store
        {**_env(1), "WORLD_SIZE": "1"},  # nobody to meet
        {k: v for k, v in _env(1).items() if k != "MASTER_PORT"},  # no master given
        {**_env(1), "MASTER_PORT": "not-a-port"},
        {**_env(1), "MASTER_PORT": "70000"},  # torch refuses it with a message of its own
        _env(1, SUPERVISE_MASTER_WAIT="0"),  # turned off
    ],
)
def test_nothing_to_wait_for(env: dict[str, str]) -> None:
    assert _warm._await_master(env) is None


def test_the_default_wait_is_shorter_than_torchs_shortest_backoff() -> None:
    assert _warm._master_wait({}) == 0.25


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_malformed_wait_says_so_in_one_line_and_keeps_the_default(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _warm._master_wait({"SUPERVISE_MASTER_WAIT": value}) == 0.25
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SUPERVISE_MASTER_WAIT" in err[0] and repr(value) in err[0]


def test_a_listening_or_connected_port_counts_as_met_an_unused_one_does_not(
    tmp_path: Path,
) -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert tcp_port_met(port)  # rank 0's store listens
        with socket.create_connection(("127.0.0.1", port)):
            conn, _ = srv.accept()
            with conn:
                srv.close()
                assert tcp_port_met(port)  # another rank's client is connected to it
    assert not tcp_port_met(free_port())
    assert not tcp_port_met(port, tables=(str(tmp_path / "absent"),))


@pytest.mark.parametrize(
    ("met", "env", "agent_env", "want"),
    [
        (None, {}, {}, {}),  # nothing known yet (the first generation): the spare's default
        (False, {}, {}, {}),  # the job meets elsewhere
        (True, {}, {}, {_warm.MASTER_WAIT_ENV: str(_warm.MASTER_WAIT_MET)}),
        (True, {_warm.MASTER_WAIT_ENV: "0"}, {}, {}),  # the user's choice stays
        (True, {}, {_warm.MASTER_WAIT_ENV: "1"}, {}),
    ],
)
def test_spares_wait_for_rank_0_as_long_as_it_takes_once_the_job_met_at_master_port(
    monkeypatch: pytest.MonkeyPatch,
    met: bool | None,
    env: dict[str, str],
    agent_env: dict[str, str],
    want: dict[str, str],
) -> None:
    monkeypatch.delenv(_warm.MASTER_WAIT_ENV, raising=False)
    for k, v in agent_env.items():
        monkeypatch.setenv(k, v)
    restart = LocalRestart(cast(Any, None), spares=None, on_exit=_ignore, report=_ignore)
    restart.met_at_master = met
    assert restart._master_wait_env(env) == want


def _ignore(*_: object, **__: object) -> None:
    return None


def test_a_long_wait_asks_a_slow_master_gently(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    clock = iter(range(10_000))
    monkeypatch.setattr(_warm.time, "monotonic", lambda: next(clock) * 0.01)
    monkeypatch.setattr(_warm.time, "sleep", sleeps.append)
    port = free_port()
    assert _warm._await_master(_env(port, SUPERVISE_MASTER_WAIT="1")) is False
    assert sleeps[0] == _warm._MASTER_POLL and sleeps[-1] == _warm._MASTER_POLL_LATER


def test_torchs_store_takes_a_probe_for_nothing_and_serves_the_rank_that_follows() -> None:
    torch_dist = pytest.importorskip("torch.distributed")
    port = free_port()
    master = torch_dist.TCPStore(
        "127.0.0.1", port, 2, True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    assert _warm._await_master(_env(port, SUPERVISE_MASTER_WAIT="5")) is True
    client = torch_dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=10))
    client.set("after", "the probe")
    assert master.get("after") == b"the probe"
