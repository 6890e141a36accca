#!/usr/bin/env python3
"""Install, start, inspect and stop a rotel OpenTelemetry collector on loopback.

    python integrations/otel/rotelctl.py install
    python integrations/otel/rotelctl.py start [--http-port 4318] [--grpc-port 4317]
                                            [--forward http://127.0.0.1:6006]
    python integrations/otel/rotelctl.py status
    python integrations/otel/rotelctl.py stop

(``--state-dir DIR`` before the command: where the PID file and log live, default ``.rotel``.)

``start`` runs rotel in the background (its own session), writes its PID, ports and log path
to ``<state-dir>/rotel.json`` and prints the ``OTEL_EXPORTER_OTLP_ENDPOINT`` to export. Without
``--forward`` rotel writes every span and metric it receives to ``<state-dir>/rotel.log``;
with it, it re-exports them as OTLP/HTTP (to arize-phoenix, another collector, a backend).
``stop`` signals that PID only, after checking it still is rotel. Port 0 picks a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

STATE_FILE = "rotel.json"


def _rotel() -> ModuleType:
    """supervise's rotel module (imported lazily: `install` needs only pip)."""
    try:
        from supervise._testing import rotel as _rotel_mod
    except ImportError:
        sys.exit("supervise is not importable here: run this with the project's venv python")
    return _rotel_mod


def cmd_install(_args: argparse.Namespace) -> int:
    """pip-install the pinned rotel into this interpreter."""
    requirement = _rotel().ROTEL_REQUIREMENT
    return subprocess.call([sys.executable, "-m", "pip", "install", requirement])


def cmd_start(args: argparse.Namespace) -> int:
    """Start rotel in the background and record its PID and ports."""
    mod = _rotel()
    state_dir = Path(args.state_dir)
    state_path = state_dir / STATE_FILE
    old = _read_state(state_path)
    if old is not None and _is_rotel(old["pid"]):
        print(f"rotel is already running (pid {old['pid']}, {old['http_endpoint']})")
        return 1
    log_path = (state_dir / "rotel.log").resolve()
    if args.forward:
        rotel = mod.Rotel.forwarding_to(
            args.forward,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            log_path=log_path,
            detach=True,
        )
    else:
        rotel = mod.Rotel(
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            exporter_args=[
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log",
                "metrics",
                "--debug-log-verbosity",
                "detailed",
            ],
            log_path=log_path,
            detach=True,
        )
    try:
        rotel.start()
    except mod.RotelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = {
        "pid": rotel.pid,
        "http_endpoint": rotel.http_endpoint,
        "grpc_endpoint": rotel.grpc_endpoint,
        "log": str(log_path),
        "forward": args.forward or "",
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    print(f"rotel running (pid {rotel.pid}); log: {log_path}")
    print(f"export OTEL_EXPORTER_OTLP_ENDPOINT={rotel.http_endpoint}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Say whether the recorded rotel runs."""
    state = _read_state(Path(args.state_dir) / STATE_FILE)
    if state is None or not _is_rotel(state["pid"]):
        print("rotel is not running")
        return 1
    print(f"rotel running (pid {state['pid']}, {state['http_endpoint']}); log: {state['log']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the recorded PID (SIGKILL after --timeout), if it still is rotel."""
    state_path = Path(args.state_dir) / STATE_FILE
    state = _read_state(state_path)
    if state is None:
        print("rotel is not running (no state file)")
        return 0
    pid = int(str(state["pid"]))
    if _is_rotel(pid):
        _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while _is_rotel(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_rotel(pid):
            _signal(pid, signal.SIGKILL)
        print(f"rotel stopped (pid {pid})")
    else:
        print(f"rotel is not running (pid {pid} is gone); removed the state file")
    state_path.unlink(missing_ok=True)
    return 0


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited between the check and the signal
        os.kill(pid, signum)


def _read_state(path: Path) -> dict[str, object] | None:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        sys.exit(f"error: {path}: unreadable state file ({exc}); delete it")
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        sys.exit(f"error: {path}: no pid in the state file; delete it")
    return state


def _is_rotel(pid: object) -> bool:
    """Whether ``pid`` is a live rotel-agent (guards against a recycled PID)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else ""
    return b"rotel-agent" in cmdline and state != "Z"


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port}: must be in 0..65535 (0 = a free one)")
    return port


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=".rotel", help="where PID, ports and log live")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help=cmd_install.__doc__).set_defaults(func=cmd_install)
    start = sub.add_parser("start", help=cmd_start.__doc__)
    start.add_argument("--http-port", type=_port, default=4318, help="OTLP/HTTP port")
    start.add_argument("--grpc-port", type=_port, default=4317, help="OTLP/gRPC port")
    start.add_argument("--forward", default="", help="re-export OTLP/HTTP to this base URL")
    start.set_defaults(func=cmd_start)
    sub.add_parser("status", help=cmd_status.__doc__).set_defaults(func=cmd_status)
    stop = sub.add_parser("stop", help=cmd_stop.__doc__)
    stop.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    stop.set_defaults(func=cmd_stop)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
