"""A spare worker process: ``python .../supervise/_warm.py GO_FILE PRELOAD -- (-m MODULE |
SCRIPT) ARGS...`` (run by its path, so that starting it imports nothing but the standard
library; see ``supervise.agents.workers``).

Imports the modules in PRELOAD (comma-separated; torch takes seconds) ahead of a restart,
creates GO_FILE with the suffix ``.warm`` to say so, then waits for GO_FILE: a JSON object
``{"env": {...}}`` with the generation's variables (RANK, MASTER_PORT, SUPERVISE_GENERATION,
...). It then runs the training command in this process as ``python -m MODULE`` or ``python
SCRIPT`` would, so a restart skips the interpreter start and the heavy imports. This module
uses the standard library only (it must configure nothing the job configures itself).

The imports run in a thread of Linux's idle scheduling class (SCHED_IDLE, that thread only):
the spare is started right after a restart, while training runs on every core, and must not
take CPU from it. The training command runs in the main thread, at its normal priority.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import sys
import threading
import time
from pathlib import Path

_POLL = 0.005  # seconds between looks for GO_FILE (a stat call: nothing while training runs)


def _usage(message: str) -> int:
    print(f"supervise._warm: {message}", file=sys.stderr, flush=True)
    return 2


def _preload(modules: str) -> None:
    for name in filter(None, modules.split(",")):
        try:
            importlib.import_module(name)
        except Exception as exc:  # the job imports it again and reports it in its own way
            print(
                f"supervise._warm: could not preload {name!r}: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )


def _set_idle_class() -> None:
    """Put the calling thread in the idle scheduling class (where the OS has one)."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _set_normal_class(thread: threading.Thread) -> None:
    """Move ``thread`` back to normal scheduling, where allowed (root, CAP_SYS_NICE)."""
    tid = thread.native_id
    if tid is not None:
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


class _WarmUp(threading.Thread):
    """Imports PRELOAD in the idle scheduling class, then marks the spare ready."""

    def __init__(self, modules: str, go_file: str) -> None:
        super().__init__(name="supervise-warm")
        self._modules = modules
        self._go_file = go_file
        self._lock = threading.Lock()
        self._urgent = False

    def run(self) -> None:
        with self._lock:
            if not self._urgent:
                _set_idle_class()
        _preload(self._modules)
        with contextlib.suppress(OSError):  # the marker only informs: a spare works without it
            Path(self._go_file).with_suffix(".warm").touch()  # the agent reports it ready

    def hurry(self) -> None:
        """The go order came: finish the imports at normal priority (where allowed)."""
        with self._lock:
            self._urgent = True
            if self.is_alive():
                _set_normal_class(self)


def _wait_for(go_file: str) -> dict[str, str]:
    path = Path(go_file)
    while not path.exists():
        time.sleep(_POLL)
    order = json.loads(path.read_text(encoding="utf-8"))
    path.unlink()
    env = order.get("env") if isinstance(order, dict) else None
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ValueError(f"{go_file}: expected {{'env': {{name: value, ...}}}}")
    return env


def main(argv: list[str]) -> int:
    """Preload, wait for the go order, then become the training process."""
    if len(argv) < 4 or argv[2] != "--":
        return _usage("usage: GO_FILE PRELOAD -- (-m MODULE | SCRIPT) ARGS...")
    go_file, preload, target = argv[0], argv[1], argv[3:]
    if target[0] == "-m" and len(target) < 2:
        return _usage("-m needs a module name")
    warm = _WarmUp(preload, go_file)
    warm.start()
    env = _wait_for(go_file)
    warm.hurry()  # imports still running: finish them at full speed
    warm.join()
    os.environ.update(env)
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        sys.path[0] = str(Path.cwd())
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        script = Path(target[0]).resolve()
        sys.argv = [target[0], *target[1:]]
        sys.path[0] = str(script.parent)
        runpy.run_path(target[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
