"""Run etcd (Debian's ``etcd-server``) on loopback: 1 or 3 members, free ports, data in a
directory of ours, always stopped by PID.

Used by the tests (the ``etcd`` fixtures) and by users through
``integrations/etcd/etcdlocal.py``. Nothing here touches the distribution's etcd service: our
members use their own ports, data directories and command-line flags, and never see ``ETCD_*``
variables from the environment (etcd would read them as flags).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

import attrs

from supervise._testing.procs import free_ports
from supervise._testing.tls import TlsFiles

#: The Debian package that provides ``etcd`` (3.4 on bookworm).
ETCD_PACKAGE: Final = "etcd-server"
#: Environment variable naming an ``etcd`` binary to use instead of the one on PATH.
ETCD_BINARY_ENV: Final = "SUPERVISE_ETCD"
LOOPBACK: Final = "127.0.0.1"
#: Raft timing for loopback: short, so leases of 1 s are allowed and a lost member is noticed
#: fast (etcd's smallest lease TTL is 1.5 election timeouts).
HEARTBEAT_MS: Final = 50
ELECTION_MS: Final = 500
_PORT_ATTEMPTS: Final = 3


class EtcdError(RuntimeError):
    """etcd could not be found, installed, started or stopped; the message says why."""


__all__ = [
    "ETCD_PACKAGE",
    "EtcdCluster",
    "EtcdError",
    "Member",
    "find_etcd",
    "install_etcd",
]


def find_etcd() -> Path | None:
    """The ``etcd`` binary: ``$SUPERVISE_ETCD``, else the one on PATH; None when absent."""
    override = os.environ.get(ETCD_BINARY_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EtcdError(f"{ETCD_BINARY_ENV}={override!r}: not an executable file")
        return path
    found = shutil.which("etcd") or shutil.which("etcd", path="/usr/bin:/usr/local/bin")
    return Path(found) if found else None


def install_etcd(timeout_s: float = 600.0) -> Path:
    """``apt-get install -y etcd-server`` (as root, where apt exists); the binary, or
    `EtcdError` saying why not. Does not start the package's service nor rely on it."""
    found = find_etcd()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise EtcdError(f"etcd not found and not root: run `apt-get install -y {ETCD_PACKAGE}`")
    if shutil.which("apt-get") is None:
        raise EtcdError("etcd not found and no apt-get here: install etcd 3.4+ and put it on PATH")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", ETCD_PACKAGE]
    for attempt in (install, ["apt-get", "update"], install):
        done = subprocess.run(attempt, env=env, capture_output=True, timeout=timeout_s, check=False)
        if attempt is install and done.returncode == 0:
            break
    found = find_etcd()
    if found is None:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise EtcdError(f"apt-get install {ETCD_PACKAGE} failed: {tail[0]}")
    return found


@attrs.define
class Member:
    """One etcd member: its name, ports, data directory and (while it runs) process."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    tls: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    @property
    def endpoint(self) -> str:
        """``host:port`` of its client API."""
        return f"{LOOPBACK}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """``size`` etcd members (1 or 3) on free loopback ports, their data under ``base_dir``.

    ``with EtcdCluster(tmp_path) as etcd: etcd.url`` -> ``etcd://127.0.0.1:P[,...]``. With
    ``tls`` the client API is HTTPS and asks for a client certificate (``etcd+https://``).
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        size: int = 1,
        binary: Path | None = None,
        detach: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        if size not in (1, 3):
            raise EtcdError(f"size {size}: 1 or 3 members")
        self.base_dir = Path(base_dir)
        self.size = size
        self.binary = binary
        self.detach = detach
        self.tls = tls
        self.members: list[Member] = []
        self._token = f"supervise-{os.getpid()}-{time.monotonic_ns()}"

    @property
    def endpoints(self) -> tuple[str, ...]:
        """``host:port`` of every member's client API."""
        return tuple(m.endpoint for m in self.members)

    @property
    def url(self) -> str:
        """The ``--store`` value for this cluster."""
        scheme = "etcd+https" if self.tls is not None else "etcd"
        return f"{scheme}://" + ",".join(self.endpoints)

    @property
    def pids(self) -> list[int]:
        """PIDs of the members that run."""
        return [m.proc.pid for m in self.members if m.proc is not None and m.running()]

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start every member, then wait until each says it is healthy (a leader exists)."""
        if self.members:
            raise EtcdError("etcd cluster already started")
        self.binary = self.binary or find_etcd()
        if self.binary is None:
            raise EtcdError(f"etcd not found: apt-get install -y {ETCD_PACKAGE}")
        last = ""
        for _ in range(_PORT_ATTEMPTS):  # a free port may be taken before etcd binds it
            ports = free_ports(2 * self.size)
            self.members = [
                Member(
                    f"m{i}",
                    ports[2 * i],
                    ports[2 * i + 1],
                    self.base_dir / f"m{i}.etcd",
                    self.base_dir / f"m{i}.log",
                    tls=self.tls is not None,
                )
                for i in range(self.size)
            ]
            try:
                for member in self.members:
                    self._launch(member)
                self.wait_healthy(timeout_s)
                return self
            except EtcdError as exc:
                last = str(exc)
                self.stop()
            except BaseException:
                self.stop()  # never leave a half-started member behind (also on Ctrl-C)
                raise
        raise EtcdError(last)

    def _argv(self, member: Member) -> list[str]:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        tls: list[str] = []
        if self.tls is not None:
            tls = [
                "--cert-file",
                str(self.tls.server_cert),
                "--key-file",
                str(self.tls.server_key),
                "--trusted-ca-file",
                str(self.tls.ca),
                "--client-cert-auth",
            ]
        return [
            str(self.binary),
            *tls,
            "--name",
            member.name,
            "--data-dir",
            str(member.data_dir),
            "--listen-client-urls",
            member.client_url,
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            member.peer_url,
            "--initial-advertise-peer-urls",
            member.peer_url,
            "--initial-cluster",
            cluster,
            "--initial-cluster-token",
            self._token,
            "--initial-cluster-state",
            "new",
            "--heartbeat-interval",
            str(HEARTBEAT_MS),
            "--election-timeout",
            str(ELECTION_MS),
            "--log-outputs",
            "stderr",
        ]

    def _launch(self, member: Member) -> None:
        member.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log: IO[bytes] = open(member.log_path, "ab")  # noqa: SIM115 (the child holds it)
        try:
            member.proc = subprocess.Popen(
                self._argv(member),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
                env=_child_env(os.environ),
            )
        finally:
            log.close()

    def wait_healthy(self, timeout_s: float = 30.0, members: list[Member] | None = None) -> None:
        """Block until every running member (or ``members``) answers ``/health`` true."""
        deadline = time.monotonic() + timeout_s
        waiting = [m for m in (members or self.members) if m.proc is not None]
        while waiting:
            for member in list(waiting):
                assert member.proc is not None
                code = member.proc.poll()
                if code is not None:
                    raise EtcdError(
                        f"etcd {member.name} exited with code {code} while starting on"
                        f" {member.endpoint}: {log_tail(member.log_path)}"
                    )
                if _healthy(member.client_port, self._health_context()):
                    waiting.remove(member)
            if not waiting:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(m.name for m in waiting)
                raise EtcdError(
                    f"etcd {names} not healthy within {timeout_s:g} s:"
                    f" {log_tail(waiting[0].log_path)}"
                )
            time.sleep(0.05)

    def _health_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        context = ssl.create_default_context(cafile=self.tls.ca)
        context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return context

    def kill(self, index: int, signum: int = signal.SIGKILL) -> int:
        """Signal member ``index`` (SIGKILL: it dies as a crashed machine would); its PID."""
        member = self.members[index]
        if member.proc is None or not member.running():
            raise EtcdError(f"etcd {member.name} is not running")
        member.proc.send_signal(signum)
        if signum in (signal.SIGKILL, signal.SIGTERM):
            member.proc.wait(timeout=10)
        return member.proc.pid

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        """Start a stopped member again on its ports and data (it rejoins the cluster)."""
        member = self.members[index]
        if member.running():
            raise EtcdError(f"etcd {member.name} is already running")
        self._launch(member)
        self.wait_healthy(timeout_s, [member])

    def stop(self, *, graceful: bool = False, timeout_s: float = 10.0) -> None:
        """Stop every member by PID and reap it: SIGKILL (the data is scratch), or with
        ``graceful`` SIGTERM first (SIGKILL after ``timeout_s``; members of a cluster stopping
        together wait on each other for seconds)."""
        signum = signal.SIGTERM if graceful else signal.SIGKILL
        for member in self.members:
            if member.proc is not None and member.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    member.proc.send_signal(signum)
        deadline = time.monotonic() + timeout_s
        for member in self.members:
            proc, member.proc = member.proc, None
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _healthy(port: int, context: ssl.SSLContext | None = None) -> bool:
    conn = (
        http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
        if context is None
        else http.client.HTTPSConnection(LOOPBACK, port, timeout=1.0, context=context)
    )
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = json.loads(response.read() or b"{}")
        return response.status == 200 and body.get("health") == "true"
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a member's log (for error messages)."""
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "(empty log)"


def _child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A member's environment: ours without any ``ETCD_*`` setting (etcd reads them as flags)."""
    return {k: v for k, v in environ.items() if not k.startswith("ETCD_")}
