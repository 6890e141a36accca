"""A process's fields from Linux's ``/proc/<pid>/stat``: one parser for the agents (who
hung, whose run dir is stale) and the test harness (which processes are left)."""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """The fields after the command name (``state``, ``ppid``, ... ``starttime`` at index 19);
    OSError (FileNotFoundError: no such process) when it cannot be read."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parens


_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """The user + system CPU time process ``pid`` (all its threads) used so far, in
    seconds; None when it cannot be read (no such process, no ``/proc``)."""
    try:
        fields = stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S
    except (OSError, IndexError, ValueError):
        return None


_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN, _ESTABLISHED = "0A", "01"


def tcp_port_met(port: int, tables: tuple[str, ...] = _TCP_TABLES) -> bool:
    """Whether a TCP socket of this network namespace listens on ``port`` or is connected to
    it (a remote ``port``): a rendezvous store that a job's processes met at. False when the
    tables cannot be read."""
    want = f":{port:04X}"
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl, local addr:port, remote addr:port, state, ...
            if len(fields) < 4:
                continue
            local, remote, state = fields[1], fields[2], fields[3]
            if (state == _LISTEN and local.endswith(want)) or (
                state == _ESTABLISHED and remote.endswith(want)
            ):
                return True
    return False
