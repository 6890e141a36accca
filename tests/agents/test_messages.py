"""Every agent.* message survives the transport's wire encoding (msgpack header, strict
decoding) with realistic values."""

from __future__ import annotations

import pytest

from supervise.agents import messages as m
from supervise.agents.selection import Holdings
from supervise.cluster import ProtocolError, _wire
from supervise.cluster.messages import KindRegistry
from supervise.snapshot.retention import VersionInfo

ENTRY = (3, 120, 2, 4096, {"loss": 0.5})

SAMPLES = [
    m.Failure(1, 2, "worker_exit", 1.0, 2.0, {"rank": 1, "exit_code": 7, "signal": None}),
    m.Prepare(3),
    m.Holding(1, [ENTRY], [ENTRY], 41234),
    m.Restart(3, 120, 41234, 2, "peer_lost", [(2, "peer", 0), (3, "disk", 1)], [(2, 100)]),
    m.Progress(1, 3, "restored", "", 4096, "peer"),
    m.GiveUp("recovery exhausted", 3),
    m.Finished(1, 3),
    m.Recover(120),
    m.RecoverReply(False, "cannot recover to version 7: version 7 is held nowhere"),
    m.StatusQuery(),
    m.Status(
        0,
        "running",
        3,
        0,
        [0, 1],
        [0],
        [ENTRY],
        [ENTRY],
        [m.WorkerStatus(0, 4321, True, True, 121, 0.25, 30.5), m.WorkerStatus(1, 0)],
        [4322],
        4300,
        4301,
        "ok",
    ),
    m.StandbyHello("tcp://127.0.0.1:7200", "127.0.0.1:7200", 1765000000.5, [1, 2]),
    m.StandbyHello("tcp://127.0.0.1:7201", "127.0.0.1:7201", 1765000001.0),
    m.StandbyOrder(1, ["tcp://127.0.0.1:7100", "tcp://127.0.0.1:7200"]),
    m.StandbyOrder(-1),
    m.RankMoved(1, "127.0.0.1:7200"),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip_through_the_wire(message: object) -> None:
    kinds = KindRegistry(m.ALL_KINDS)
    name, body = kinds.encode(message)
    raw = _wire.encode_header(name, 0, 1, _wire.MESSAGE, body, 0, None)
    header = _wire.decode_header(memoryview(raw), 1 << 16)
    assert kinds.decode(header.kind, header.body) == message


def test_every_kind_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(m.ALL_KINDS)


def test_a_field_of_the_wrong_type_is_a_clear_protocol_error() -> None:
    kinds = KindRegistry(m.ALL_KINDS)
    name, body = kinds.encode(m.Restart(3, 10, 4321, 1, "peer_lost", [(1, "peer", 0)], []))
    body["fetch"] = [["one", "peer", 0]]
    raw = _wire.encode_header(name, 0, 1, _wire.MESSAGE, body, 0, None)
    header = _wire.decode_header(memoryview(raw), 1 << 20)
    with pytest.raises(ProtocolError, match=r"agent\.restart: bad body"):
        kinds.decode(header.kind, header.body)


def test_holdings_travel_as_entries_and_come_back_as_versions() -> None:
    info = VersionInfo(120, 2, 0.0, 4096, {"loss": 0.5}, "local")
    disk = VersionInfo(100, 1, 0.0, 2048, {}, "disk")
    holdings = Holdings.of(1, ram=[(3, info)], disk=[(3, disk)])
    holding = m.Holding.of(holdings, port=41234)
    assert holding.ram == [(3, 120, 2, 4096, {"loss": 0.5})]
    assert holding.port == 41234
    assert holding.holdings() == holdings
