"""Run rotel (PyPI ``rotel``, a Rust OpenTelemetry collector) on loopback.

Used by the tests (rotel forwarding to an in-process receiver) and by users through
``integrations/otel/rotelctl.py``. The process is always ours: started here, stopped by PID.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

#: What ``integrations/otel/rotelctl.py install`` and the ``dev`` extra install.
ROTEL_REQUIREMENT: Final = "rotel==0.0.1a15"
#: Environment variable naming a ``rotel-agent`` binary to use instead of the installed one.
ROTEL_AGENT_ENV: Final = "SUPERVISE_ROTEL_AGENT"
LOOPBACK: Final = "127.0.0.1"
_PORT_ATTEMPTS: Final = 5


class RotelError(RuntimeError):
    """rotel could not be found, started or stopped; the message says why and what to do."""


def find_rotel_agent() -> Path:
    """The ``rotel-agent`` binary: ``$SUPERVISE_ROTEL_AGENT``, the ``rotel`` package's, or PATH."""
    override = os.environ.get(ROTEL_AGENT_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RotelError(f"{ROTEL_AGENT_ENV}={override!r}: not an executable file")
        return path
    spec = importlib.util.find_spec("rotel")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "rotel-agent"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    found = shutil.which("rotel-agent")
    if found:
        return Path(found)
    raise RotelError(
        "rotel-agent not found: install the dev extra (pip install -e '.[dev]') or run"
        f" `python integrations/otel/rotelctl.py install` (pip install {ROTEL_REQUIREMENT})"
    )


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _otlp_http_ready(host: str, port: int) -> bool:
    """Whether an OTLP/HTTP receiver answers on ``host:port`` (an empty export is accepted)."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request(
            "POST", "/v1/traces", body=b"", headers={"Content-Type": "application/x-protobuf"}
        )
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):  # not up yet, or not speaking HTTP yet
        return False
    finally:
        conn.close()


class Rotel:
    """One ``rotel-agent`` receiving OTLP on loopback (gRPC and HTTP) and exporting onward.

    ``exporter_args`` are rotel's exporter flags; the default drops everything
    (``--exporter blackhole``). ``Rotel.forwarding_to(url)`` re-exports OTLP/HTTP to ``url``.
    """

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        grpc_port: int = 0,
        http_port: int = 0,
        exporter_args: Sequence[str] = ("--exporter", "blackhole"),
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        agent: Path | None = None,
        detach: bool = False,
    ) -> None:
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.exporter_args = tuple(exporter_args)
        self.extra_args = tuple(extra_args)
        self.log_path = log_path
        self.agent = agent
        self.detach = detach
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def forwarding_to(cls, endpoint: str, **kwargs: object) -> Rotel:
        """A rotel that re-exports everything it receives as OTLP/HTTP to ``endpoint``."""
        exporter = [
            "--exporter",
            "otlp",
            "--otlp-exporter-protocol",
            "http",
            "--otlp-exporter-endpoint",
            endpoint,
            "--otlp-exporter-compression",
            "none",
        ]
        return cls(exporter_args=exporter, **kwargs)  # type: ignore[arg-type]

    @property
    def pid(self) -> int | None:
        """The agent's PID while it runs."""
        return None if self._proc is None else self._proc.pid

    @property
    def http_endpoint(self) -> str:
        """Base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``http://127.0.0.1:PORT``)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        """``host:port`` of the OTLP/gRPC receiver."""
        return f"{self.host}:{self.grpc_port}"

    def argv(self) -> list[str]:
        """The command line (ports must be chosen)."""
        agent = self.agent or find_rotel_agent()
        return [
            str(agent),
            "--log-format",
            "json",
            "start",
            "--otlp-grpc-endpoint",
            self.grpc_endpoint,
            "--otlp-http-endpoint",
            f"{self.host}:{self.http_port}",
            *self.exporter_args,
            *self.extra_args,
        ]

    def start(self, timeout_s: float = 30.0) -> Self:
        """Start the agent and wait until its OTLP/HTTP receiver accepts an export."""
        if self._proc is not None:
            raise RotelError(f"rotel already started (pid {self._proc.pid})")
        self.agent = self.agent or find_rotel_agent()
        wanted_grpc, wanted_http = self.grpc_port, self.http_port
        fixed = bool(wanted_grpc and wanted_http)
        last = ""
        for _ in range(1 if fixed else _PORT_ATTEMPTS):
            # a free port may be taken between probe and bind: retry with fresh ones
            self.grpc_port = wanted_grpc or free_port(self.host)
            self.http_port = wanted_http or free_port(self.host)
            try:
                self._launch(timeout_s)
                return self
            except RotelError as exc:
                last = str(exc)
        raise RotelError(last)

    def _launch(self, timeout_s: float) -> None:
        log: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it; closed below)
        try:
            proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
                env=_child_env(os.environ),
            )
        finally:
            if not isinstance(log, int):
                log.close()
        self._proc = proc
        try:
            self._wait_ready(proc, timeout_s)
        except BaseException:
            self.stop()  # never leave a half-started agent behind (also on Ctrl-C)
            raise

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise RotelError(
                    f"rotel-agent exited with code {code} while starting on"
                    f" {self.host}:{self.http_port}: {self.log_tail()}"
                )
            if _otlp_http_ready(self.host, self.http_port) and proc.poll() is None:
                return
            time.sleep(0.02)
        raise RotelError(
            f"rotel-agent did not accept OTLP on {self.http_endpoint} within {timeout_s:g} s:"
            f" {self.log_tail()}"
        )

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the agent's log (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty log)"

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (rotel flushes its exporters), SIGKILL after ``timeout_s``; the exit code."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def __enter__(self) -> Self:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _child_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment: ours without any ``ROTEL_*`` setting that would override flags."""
    return {k: v for k, v in environ.items() if not k.startswith("ROTEL_")}
