"""The rendezvous port is chosen outside the kernel's ephemeral range (no EADDRINUSE race)."""

from __future__ import annotations

import socket

from supervise.agents.workers import _ephemeral_low, free_port


def test_port_is_below_the_ephemeral_range_and_listenable() -> None:
    low = _ephemeral_low()
    for _ in range(20):
        port = free_port("127.0.0.1", ephemeral_low=32768)
        assert 20000 <= port < 32768
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen(1)
    if low is not None and low >= 21000:
        assert free_port("127.0.0.1") < low


def test_without_room_below_the_range_the_kernel_picks() -> None:
    port = free_port("127.0.0.1", ephemeral_low=1024)
    assert 0 < port < 65536


def test_an_unreadable_range_is_unknown(tmp_path) -> None:
    assert _ephemeral_low(str(tmp_path / "missing")) is None
    (tmp_path / "range").write_text("garbage")
    assert _ephemeral_low(str(tmp_path / "range")) is None
