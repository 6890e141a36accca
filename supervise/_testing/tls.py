"""Throw-away TLS files for tests: a CA, and a server (127.0.0.1) and client certificate it
signed, made with the ``openssl`` command (EC keys, valid one day)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Final

import attrs

LOOPBACK: Final = "127.0.0.1"


class TlsError(RuntimeError):
    """The files could not be made (no ``openssl``, or it failed); the message says why."""


@attrs.frozen(slots=True)
class TlsFiles:
    """A test CA and the certificates it signed for the server (127.0.0.1) and a client."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throw-away CA, server and client certificate (EC keys, one day) made with the
    ``openssl`` command; `EtcdError` when it is missing or fails."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsError("openssl not found: it makes the test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    key_args = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run(
            [openssl, *args], cwd=directory, capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise TlsError(f"openssl {args[0]} failed: {tail[0]}")

    run("req", "-x509", *key_args, *_out("ca"), "-days", "1", "-subj", "/CN=supervise-test-ca")
    for name, usage in (("server", "serverAuth,clientAuth"), ("client", "clientAuth")):
        ext = directory / f"{name}.ext"
        ext.write_text(f"subjectAltName=IP:{LOOPBACK}\nextendedKeyUsage={usage}\n")
        run(
            "req",
            *key_args,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        signed_by_ca = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            *signed_by_ca,
            "-out",
            f"{name}.pem",
            "-extfile",
            ext.name,
        )
    return TlsFiles(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


def _out(name: str) -> list[str]:
    return ["-keyout", f"{name}.key", "-out", f"{name}.pem"]
