"""Start-up checks of what a node agent needs from the machine, before anything starts: keys
when it listens beyond loopback, its port free, ``--shm-dir`` a writable directory, the
training command runnable, the persist directory writable with room for a snapshot. Each
failure is a `StartupError` naming the bad thing in one line (``supervise node`` prints it and
exits 2), instead of an internal error or a command that fails only after every recovery
attempt.

`NodeConfig` checks the values themselves (ranges, finite numbers); these check resources.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

from supervise.agents.config import NodeConfig
from supervise.agents.workers import warm_target
from supervise.cluster.transport import normalize_endpoint
from supervise.snapshot.budget import fmt_bytes
from supervise.snapshot.persist import PersistTier

__all__ = ["StartupError", "check_authenticated", "check_startup", "listens_on_loopback"]


class StartupError(Exception):
    """A resource a node agent needs is missing or unusable; ``flag`` is what names it."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag = flag
        super().__init__(f"{flag}: {message}")


def check_startup(config: NodeConfig, *, env: Mapping[str, str] | None = None) -> None:
    """Raise `StartupError` for the first resource the agent of ``config`` could not use."""
    environ = {**os.environ, **config.env} if env is None else {**env, **config.env}
    check_authenticated(config)
    check_port_free(config.endpoint)
    check_writable_dir("--shm-dir", config.shm_dir)
    if config.farm is None:  # a farm node runs no command
        check_command(config.command, cwd=config.cwd, env=environ)
    persist = config.policy.persist
    if persist.every_snapshots:
        tiers = [
            PersistTier(persist.path, rank=r, keep=persist.keep, job=config.job_id)
            for r in config.ranks
        ]
        check_persist_room(tiers)


def listens_on_loopback(endpoint: str) -> bool:
    """Whether ``host:port`` binds loopback addresses only (``127.0.0.0/8``, ``::1``): no
    other machine can reach it. A wildcard, an interface name or a host that does not
    resolve counts as beyond loopback."""
    host = normalize_endpoint(endpoint).removeprefix("tcp://").rpartition(":")[0].strip("[]")
    if host in ("*", ""):
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    try:
        return bool(infos) and all(
            ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
        )
    except ValueError:
        return False


def check_authenticated(config: NodeConfig) -> None:
    """An agent that listens beyond loopback has CURVE keys (``replication.curve``): without
    them anyone who reaches its port could read or overwrite snapshots and stop the job."""
    if config.policy.replication.curve or listens_on_loopback(config.endpoint):
        return
    raise StartupError(
        "replication.curve",
        f"this node listens on {config.endpoint}, beyond loopback, without keys: create them "
        f"with `supervise keys generate DIR --nodes {config.n_nodes}`, copy DIR to every node "
        "and set replication.curve = true and replication.curve_keys = DIR",
    )


def check_port_free(endpoint: str) -> None:
    """The agent's own ``host:port`` can be bound now (as zmq will: with SO_REUSEADDR)."""
    address = normalize_endpoint(endpoint).removeprefix("tcp://")
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    flag = f"--nodes entry {endpoint!r} (this node's)"
    if host == "*":
        host = "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        try:
            interfaces = {name for _, name in socket.if_nameindex()}
        except OSError:
            interfaces = set()
        if host in interfaces:
            return  # a zmq interface name: zmq resolves it itself
        raise StartupError(flag, f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
            s.listen(1)
        except OSError as exc:
            raise StartupError(flag, f"cannot listen on it: {exc.strerror}") from None


def check_writable_dir(flag: str, path: str | os.PathLike[str]) -> None:
    """``path`` is a directory this process may create files in; a missing one must be
    creatable (its nearest existing parent a writable directory)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise StartupError(flag, f"{str(p)!r} is not a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StartupError(flag, f"{str(p)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StartupError(flag, f"{str(existing)!r} is not writable")


def check_command(
    command: tuple[str, ...], *, cwd: str | None = None, env: Mapping[str, str] | None = None
) -> None:
    """The command's program exists and is executable (looked up on ``PATH`` unless it is a
    path); for ``python SCRIPT`` the script exists too (``python -m MODULE`` is not checked)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    program = command[0]
    if os.sep in program:
        path = base / program
        if not path.exists():
            raise StartupError("command", f"{program!r} does not exist")
        if path.is_dir() or not os.access(path, os.X_OK):
            raise StartupError("command", f"{program!r} is not an executable file")
    else:
        search = (env if env is not None else os.environ).get("PATH", os.defpath)
        if shutil.which(program, path=search) is None:
            raise StartupError("command", f"{program!r} is not found on PATH or not executable")
    target = warm_target(command)
    if target is not None and target[0] != "-m" and not (base / target[0]).is_file():
        raise StartupError("command", f"the script {target[0]!r} does not exist")


def check_persist_room(tiers: list[PersistTier]) -> None:
    """The persist directory is writable, and (where a snapshot's size is known from the files
    already there) has room for one snapshot of every local rank, counting what retention may
    free before a write."""
    if not tiers:
        return
    path = tiers[0].root  # persist.path as given (each job's files go in a directory below it)
    check_writable_dir("persist.path", path)
    needed = 0
    reclaimable = 0
    for tier in tiers:
        entries = tier.entries(quiet=True)  # the agent names other jobs' files, once
        if not entries:
            continue
        needed += entries[-1].path.stat().st_size
        keep = max(tier.keep - 1, 1)
        reclaimable += sum(e.path.stat().st_size for e in entries[:-keep])
    if not needed:
        return
    st = os.statvfs(path if path.exists() else path.parent)
    free = st.f_bavail * st.f_frsize
    if free + reclaimable < needed:
        raise StartupError(
            "persist.path",
            f"{str(path)!r} has {fmt_bytes(free)} free, one snapshot of this node's ranks "
            f"needs {fmt_bytes(needed)}: free some room, or lower persist.keep",
        )
