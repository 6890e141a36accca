"""A process's fields from Linux's ``/proc/<pid>/stat``: one parser for the agents (who
hung, whose run dir is stale) and the test harness (which processes are left)."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """The fields after the command name (``state``, ``ppid``, ... ``starttime`` at index 19);
    OSError (FileNotFoundError: no such process) when it cannot be read."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
