"""CURVE: key files, authenticated + encrypted links, strangers and plain peers refused."""

from __future__ import annotations

import stat
from pathlib import Path

import attrs
import pytest
import zmq
from clusterkit import eventually

from supervise.cluster import (
    CurveKeyError,
    CurveKeys,
    Incoming,
    RequestTimeout,
    Transport,
    generate_keys,
    message_kind,
)


@message_kind("test.curve.ping")
@attrs.frozen(slots=True)
class Ping:
    n: int


def test_generate_writes_key_pairs(tmp_path: Path) -> None:
    files = generate_keys(tmp_path / "keys", 3)
    names = sorted(p.name for p in files)
    assert names == sorted(
        [f"node-{r}.key{s}" for r in range(3) for s in ("", "_secret")]
        + ["client.key", "client.key_secret"]
    )
    secret = tmp_path / "keys" / "node-1.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    keys = CurveKeys.for_node(tmp_path / "keys", 1)
    assert keys.name == "node-1"
    assert sorted(keys.known) == ["client", "node-0", "node-1", "node-2"]
    assert keys.server_key(2) == keys.known["node-2"]
    assert "secret" not in repr(keys) and keys.secret.decode() not in repr(keys)
    # libzmq's own certificate reader agrees with us
    import zmq.auth

    assert zmq.auth.load_certificate(secret) == (keys.public, keys.secret)


def test_generate_refuses_to_overwrite_and_bad_args(tmp_path: Path) -> None:
    generate_keys(tmp_path, 2)
    with pytest.raises(CurveKeyError, match=r"node-0.key already exists .*overwrite"):
        generate_keys(tmp_path, 2)
    old = CurveKeys.for_node(tmp_path, 0).public
    generate_keys(tmp_path, 2, overwrite=True)
    assert CurveKeys.for_node(tmp_path, 0).public != old
    with pytest.raises(CurveKeyError, match="nodes = 0"):
        generate_keys(tmp_path / "x", 0)
    with pytest.raises(CurveKeyError, match="client key name 'node-9'"):
        generate_keys(tmp_path / "y", 1, clients=("node-9",))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CurveKeyError, match=r"directory .* does not exist"):
        CurveKeys.for_node(tmp_path / "nope", 0)
    generate_keys(tmp_path, 1)
    with pytest.raises(CurveKeyError, match=r"node-4.key_secret not found .*supervise keys"):
        CurveKeys.for_node(tmp_path, 4)
    with pytest.raises(CurveKeyError, match="no public key for node-3"):
        CurveKeys.load(tmp_path, "client").server_key(3)
    (tmp_path / "node-0.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(CurveKeyError, match=r"node-0.key has no valid public-key"):
        CurveKeys.for_node(tmp_path, 0)


async def _pinger(keys_dir: Path) -> Transport:
    server = Transport(rank=0, endpoint="127.0.0.1:0", curve=CurveKeys.for_node(keys_dir, 0))

    async def ping(msg: Incoming[Ping]) -> Ping:
        return Ping(msg.body.n + 1)

    server.handle(Ping, ping)
    return server


async def test_curve_peers_talk_and_strangers_are_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, 2)
    server = await _pinger(tmp_path)
    async with server.running():
        assert server.endpoint is not None
        peer = Transport(rank=1, peers={0: server.endpoint}, curve=CurveKeys.for_node(tmp_path, 1))
        client_keys = CurveKeys.load(tmp_path, "client")
        client = Transport(rank=None, peers={0: server.endpoint}, curve=client_keys)
        async with peer.running(), client.running():
            assert (await peer.request(0, Ping(1), expect=Ping)).body.n == 2
            assert (await client.request(0, Ping(5), expect=Ping)).body.n == 6

        # a stranger: valid CURVE keys that are not in the directory
        other = tmp_path / "other"
        generate_keys(other, 2)
        stranger_keys = attrs.evolve(
            CurveKeys.for_node(other, 1), known={"node-0": CurveKeys.for_node(tmp_path, 0).public}
        )
        stranger = Transport(rank=1, peers={0: server.endpoint}, curve=stranger_keys)
        plain = Transport(rank=1, peers={0: server.endpoint})  # no CURVE at all
        async with stranger.running(), plain.running():
            with pytest.raises(RequestTimeout):
                await stranger.request(0, Ping(1), timeout=1.0)
            with pytest.raises(RequestTimeout):
                await plain.request(0, Ping(1), timeout=1.0)
        assert server.stats.auth_refused >= 1

        # nothing broke: an authorised peer still gets answers
        peer = Transport(rank=1, peers={0: server.endpoint}, curve=CurveKeys.for_node(tmp_path, 1))
        async with peer.running():
            assert (await peer.request(0, Ping(10), expect=Ping)).body.n == 11
    assert server.stats.handler_errors == 0


async def test_curve_sender_cannot_claim_another_rank(tmp_path: Path) -> None:
    generate_keys(tmp_path, 3)
    server = await _pinger(tmp_path)
    async with server.running():
        assert server.endpoint is not None
        # node-1's keys, but the header claims rank 2
        liar = Transport(rank=2, peers={0: server.endpoint}, curve=CurveKeys.for_node(tmp_path, 1))
        async with liar.running():
            with pytest.raises(RequestTimeout):
                await liar.request(0, Ping(1), timeout=1.0)
        await eventually(lambda: server.stats.dropped["malformed"] > 0)


def test_curve_is_available() -> None:
    assert zmq.has("curve")


def test_cli_generates_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from supervise.cli import main

    assert main(["keys", "generate", str(tmp_path / "k"), "--nodes", "3"]) == 0
    assert "wrote 4 key pairs" in capsys.readouterr().out
    assert CurveKeys.for_node(tmp_path / "k", 2).name == "node-2"
    assert main(["keys", "generate", str(tmp_path / "k"), "--nodes", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--force" in err
    assert main(["keys", "generate", str(tmp_path / "k"), "--nodes", "3", "--force"]) == 0
    assert main(["keys", "generate", str(tmp_path / "z"), "--nodes", "0"]) == 2
    assert "nodes = 0" in capsys.readouterr().err
