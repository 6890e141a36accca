"""``--store`` values: what parses, and a one-line error naming the problem for what does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervise.store import BadStoreUrl, StoreKind, parse_store_url


def test_good_urls(tmp_path: Path) -> None:
    embedded = parse_store_url("embedded")
    assert (embedded.kind, embedded.prefix) == (StoreKind.EMBEDDED, "/supervise/default/")
    etcd = parse_store_url("etcd://10.0.0.1:2379,etcd-2.local:2379/", job="run-7")
    assert etcd.kind is StoreKind.ETCD
    assert etcd.base_urls == ("http://10.0.0.1:2379", "http://etcd-2.local:2379")
    assert etcd.prefix == "/supervise/run-7/"
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    tls = parse_store_url("etcd+https://[::1]:2379", ca=ca)
    assert tls.base_urls == ("https://[::1]:2379",) and tls.ca == ca
    with pytest.raises(BadStoreUrl, match="TLS files unusable"):
        tls.ssl_context()  # a file that is not PEM: one line when the client is made


@pytest.mark.parametrize(
    ("url", "kwargs", "why"),
    [
        ("etcd:/host:2379", {}, "use 'embedded'"),
        ("zookeeper://h:1", {}, "use 'embedded'"),
        ("etcd://", {}, "no endpoint"),
        ("etcd://host", {}, "expected HOST:PORT"),
        ("etcd://host:0", {}, "port must be"),
        ("etcd://host:70000", {}, "port must be"),
        ("etcd://host:2379/v3", {}, "without a path"),
        ("etcd://user@host:2379", {}, "without a path"),
        ("etcd://h:1,h:1", {}, "listed twice"),
        ("etcd://h:1", {"ca": "ca.pem"}, "need an etcd+https"),
        ("embedded", {"key": "k.pem"}, "need an etcd+https"),
        ("etcd+https://h:1", {"cert": "c.pem"}, "go together"),
        ("etcd+https://h:1", {"ca": "/nonexistent/ca.pem"}, "no such file"),
        ("embedded", {"job": "a/b"}, "job 'a/b'"),
        ("etcd://h:1", {"timeout_s": 0}, "timeout 0"),
    ],
)
def test_bad_urls_are_one_line(url: str, kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(BadStoreUrl) as caught:
        parse_store_url(url, **kwargs)  # type: ignore[arg-type]
    assert why in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)
