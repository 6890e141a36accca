"""A warm task worker: ``python -m supervise.tasks._pool_worker FD [PRELOAD]``.

Started by a `TaskPool` with its end of a socket pair as descriptor FD. It imports the modules
in PRELOAD (comma-separated) once, says `Ready`, then runs one attempt per `Order` — each in
a trio run of its own, with its own `TaskContext` and journal handle (the task's shard on the
host named by the order's environment, under the attempt's token and fence) and the order's
environment variables set for that attempt only — and says `Done` after each. Module state
(globals, caches, imported modules) carries over from one attempt to the next, as in Celery's
prefork pool: a task must not rely on a fresh interpreter.

It exits instead of answering when the attempt leaves it in doubt: SIGTERM during an attempt
(a pause, a cancel: it commits the finished steps first; exit 3, `_worker.STOPPED`), a journal
it could not use (exit 2), `SystemExit` from the task; and at the end of its socket (exit 0:
the pool retired it). The pool replaces it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import sys
from pathlib import Path

import trio

from supervise.snapshot.errors import SnapshotError
from supervise.tasks._pool_wire import Done, Order, Ready, encode, recv_blocking
from supervise.tasks._worker import agent_journal, run_one
from supervise.tasks.journal import CorruptRecord
from supervise.tasks.spec import TaskSpec
from supervise.tasks.telemetry import parent_from_env
from supervise.telemetry import TelemetryError, setup_telemetry, shutdown_telemetry, using

CANNOT_RUN = 2
"""Exit code when an order could not be run at all (its journal, its spec)."""


def _preload(modules: str) -> None:
    for name in filter(None, modules.split(",")):
        try:
            importlib.import_module(name)
        except Exception as exc:  # the task imports it again and reports it in its own way
            print(f"supervise task worker: could not preload {name!r}: {exc!r}", file=sys.stderr)


def _attempt(order: Order) -> int:
    """Run ``order``'s attempt with its environment; the `_worker` exit code it ended with."""
    os.environ.update(order.env)
    try:
        spec = TaskSpec.from_bytes(order.spec, "task spec")
        journal = agent_journal()
    except (CorruptRecord, SnapshotError, OSError) as exc:
        print(f"supervise task worker: {exc}", file=sys.stderr)
        return CANNOT_RUN
    try:
        with using(parent_from_env(os.environ)):  # steps: children of the runner's attempt
            return trio.run(run_one, spec, order.attempt, order.node, journal)
    except (OSError, CorruptRecord, SnapshotError) as exc:
        print(f"supervise task worker: {exc}", file=sys.stderr)
        return CANNOT_RUN
    except BaseExceptionGroup as group:  # from the attempt's nursery: e.g. a refused commit
        journal_errors, rest = group.split((OSError, CorruptRecord, SnapshotError))
        if rest is not None or journal_errors is None:
            raise
        first: BaseException = journal_errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"supervise task worker: {first}", file=sys.stderr)
        return CANNOT_RUN
    finally:
        journal.owner.close()  # its socket and the arena mappings of this attempt


def _restore(baseline: dict[str, str]) -> None:
    """Set ``os.environ`` back to ``baseline`` (only what changed: each change is a putenv)."""
    for key in [k for k in os.environ if k not in baseline]:
        del os.environ[key]
    for key, value in baseline.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _leave(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def serve(sock: socket.socket) -> int:
    """Run the pool's orders until it closes ``sock`` (0) or an attempt ends in doubt.
    SIGTERM between attempts: exit 0 (the telemetry flushed); during one: see `run_one`."""
    signal.signal(signal.SIGTERM, _leave)  # trio's receiver replaces it during an attempt
    baseline = dict(os.environ)
    cwd = Path.cwd()
    ran = 0
    sock.sendall(encode(Ready(os.getpid(), ran)))
    while True:
        msg = recv_blocking(sock)
        if msg is None:
            return 0
        if not isinstance(msg, Order):
            print(f"supervise task worker: unexpected {type(msg).__name__}", file=sys.stderr)
            return CANNOT_RUN
        try:
            code = _attempt(msg)
        finally:  # the next attempt starts from the worker's own environment
            _restore(baseline)
            with contextlib.suppress(OSError):
                os.chdir(cwd)
            sys.stdout.flush()
            sys.stderr.flush()
        ran += 1
        if code not in (0, 1):  # stopped (STOPPED) or could not run: not reused
            return code
        sock.sendall(encode(Done(code)))


def main(argv: list[str]) -> int:
    """Serve the pool on descriptor ``argv[0]``."""
    if len(argv) not in (1, 2) or not argv[0].isdigit():
        print("usage: python -m supervise.tasks._pool_worker FD [PRELOAD]", file=sys.stderr)
        return CANNOT_RUN
    sock = socket.socket(fileno=int(argv[0]))
    try:  # OTEL_* of the environment: off (and free) unless it names a collector
        setup_telemetry()
    except TelemetryError as exc:  # the tasks run all the same, untraced
        print(f"supervise task worker: telemetry off: {exc}", file=sys.stderr)
    _preload(argv[1] if len(argv) == 2 else "")
    try:
        return serve(sock)
    except OSError as exc:  # the pool's end went away
        print(f"supervise task worker: {exc}", file=sys.stderr)
        return CANNOT_RUN
    finally:
        sock.close()
        shutdown_telemetry(5.0)  # flush the step spans before the exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
