"""Files and directories only their owner may read: snapshots, run dirs, tokens.

Modes are set explicitly after creation (``chmod``), so a permissive umask (``umask 0``)
never widens them, and a restrictive one never leaves the owner locked out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

PRIVATE_DIR: Final = 0o700
PRIVATE_FILE: Final = 0o600


def private_dirs(path: str | os.PathLike[str]) -> Path:
    """Make ``path`` and any missing parents, each one created here with mode 0700
    (directories that already exist are left as they are); returns it."""
    path = Path(path)
    missing: list[Path] = []
    at = path
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made meanwhile by someone else: theirs
        d.chmod(PRIVATE_DIR)
    return path


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open(path, flags | O_CREAT)`` with the file's mode set to 0600; a file descriptor."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path``, created or truncated, mode 0600."""
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
