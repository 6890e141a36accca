#!/usr/bin/env python3
"""Install, start, inspect and stop a scratch etcd (1 or 3 members) on loopback.

    python integrations/etcd/etcdlocal.py install
    python integrations/etcd/etcdlocal.py start [--members 3]
    python integrations/etcd/etcdlocal.py status
    python integrations/etcd/etcdlocal.py stop

(``--state-dir DIR`` before the command: where the PID file, data and logs live, default
``.etcd``.)

``install`` runs ``apt-get install -y etcd-server`` (Debian's etcd 3.4; root only) when no
``etcd`` is on PATH. ``start`` runs the members in the background on free loopback ports with
their data in ``<state-dir>/data`` (wiped: this is a scratch cluster for tests and demos, not a
deployment), writes their PIDs to ``<state-dir>/etcd.json`` and prints the ``--store`` value.
``stop`` signals those PIDs only, after checking each still is that etcd. The distribution's
own etcd service is neither needed nor touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import ModuleType

STATE_FILE = "etcd.json"


def _etcd() -> ModuleType:
    """supervise's etcd helpers (the project's venv python has them)."""
    try:
        from supervise._testing import etcd as _etcd_mod
    except ImportError:
        sys.exit("supervise is not importable here: run this with the project's venv python")
    return _etcd_mod


def cmd_install(_args: argparse.Namespace) -> int:
    """apt-get install etcd-server where etcd is missing (root only)."""
    mod = _etcd()
    try:
        binary = mod.install_etcd()
    except mod.EtcdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"etcd: {binary}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """Start the members in the background and record their PIDs and endpoints."""
    mod = _etcd()
    state_dir = Path(args.state_dir).resolve()
    state_path = state_dir / STATE_FILE
    old = _read_state(state_path)
    if old is not None and any(_is_ours(pid, old) for pid in old["pids"]):
        print(f"etcd is already running ({old['url']})")
        return 1
    data = state_dir / "data"
    shutil.rmtree(data, ignore_errors=True)
    cluster = mod.EtcdCluster(data, size=args.members, detach=True)
    try:
        cluster.start()
    except mod.EtcdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = {"pids": cluster.pids, "url": cluster.url, "data": str(data)}
    state_path.write_text(json.dumps(state, indent=2) + "\n")
    print(f"etcd running ({args.members} member(s), pids {cluster.pids}); data and logs: {data}")
    print(f"--store {cluster.url}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Say which recorded members run."""
    state = _read_state(Path(args.state_dir) / STATE_FILE)
    if state is None:
        print("etcd is not running")
        return 1
    alive = [pid for pid in state["pids"] if _is_ours(pid, state)]
    if not alive:
        print("etcd is not running")
        return 1
    print(f"etcd running: {len(alive)} of {len(state['pids'])} member(s), {state['url']}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the recorded PIDs (SIGKILL after --timeout), those that still are our etcd."""
    state_path = Path(args.state_dir) / STATE_FILE
    state = _read_state(state_path)
    if state is None:
        print("etcd is not running (no state file)")
        return 0
    pids = [pid for pid in state["pids"] if _is_ours(pid, state)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while any(_is_ours(pid, state) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _is_ours(pid, state):
            _signal(pid, signal.SIGKILL)
    print(f"etcd stopped (pids {pids})" if pids else "etcd was not running")
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
    pids = state.get("pids") if isinstance(state, dict) else None
    if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
        sys.exit(f"error: {path}: no pids in the state file; delete it")
    return state


def _is_ours(pid: object, state: dict[str, object]) -> bool:
    """Whether ``pid`` is a live etcd with our data directory (guards against PID reuse)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = ")" in stat and stat.rsplit(")", 1)[-1].split()[0] == "Z"
    data = str(state["data"]).encode()
    return (
        not zombie
        and Path(cmdline[0].decode(errors="replace")).name == "etcd"
        and any(arg.startswith(data) for arg in cmdline)
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=".etcd", help="where PIDs, data and logs live")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help=cmd_install.__doc__).set_defaults(func=cmd_install)
    start = sub.add_parser("start", help=cmd_start.__doc__)
    start.add_argument("--members", type=int, choices=(1, 3), default=1, help="cluster size")
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
