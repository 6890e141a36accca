"""A warm task worker: ``python -m supervise.tasks._pool_worker FD [PRELOAD]``.

Started by a `TaskPool` with its end of a socket pair as descriptor FD. It imports the modules
in PRELOAD (comma-separated) once, says `Ready`, then runs one attempt per `Order` — each in
a trio run of its own, with its own `TaskContext` and journal handle (the task's shard on the
host named by the order's environment, under the attempt's token and fence) and the order's
environment variables set for that attempt only — and says `Done` after each (with the
attempt's outcome when it is small: the agent commits it, so a task that commits no step
never reaches the journal endpoint; nor is the journal read when the order says it is empty).
Module state (globals, caches, imported modules) carries over from one attempt to the next,
as in Celery's prefork pool: a task must not rely on a fresh interpreter.

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
from supervise.tasks._worker import agent_journal, journal_error, run_one
from supervise.tasks.arena_journal import ArenaJournal
from supervise.tasks.journal import Commit, CorruptRecord, JournalView, Outcome
from supervise.tasks.spec import TaskSpec
from supervise.tasks.telemetry import parent_from_env
from supervise.telemetry import TelemetryError, setup_telemetry, shutdown_telemetry, using

CANNOT_RUN = 2
"""Exit code when an order could not be run at all (its journal, its spec)."""
INLINE_OUTCOME = 1 << 20
"""The largest outcome value handed back in `Done` (larger ones go through the journal's RAM)."""


class _AttemptJournal:
    """The journal as one pooled attempt sees it: opened on first use (never, for an order
    on an empty journal whose task commits no step), and a small outcome kept for `Done`."""

    def __init__(self, fresh: bool) -> None:
        self._fresh = fresh
        self._journal: ArenaJournal | None = None
        self.outcome_for_agent: Outcome | None = None

    def _open(self) -> ArenaJournal:
        if self._journal is None:
            self._journal = agent_journal()
        return self._journal

    def read(self) -> JournalView:
        return JournalView() if self._fresh and self._journal is None else self._open().read()

    def commit(self, commit: Commit) -> None:
        self._open().commit(commit)

    def finish(self, outcome: Outcome) -> None:
        if len(outcome.value or b"") <= INLINE_OUTCOME:
            self.outcome_for_agent = outcome
        else:
            self._open().finish(outcome)

    def outcome(self) -> Outcome | None:
        if self.outcome_for_agent is not None:
            return self.outcome_for_agent
        return None if self._fresh and self._journal is None else self._open().outcome()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.owner.close()  # its socket and the arena mappings of this attempt


def _preload(modules: str) -> None:
    for name in filter(None, modules.split(",")):
        try:
            importlib.import_module(name)
        except Exception as exc:  # the task imports it again and reports it in its own way
            print(f"supervise task worker: could not preload {name!r}: {exc!r}", file=sys.stderr)


def _attempt(order: Order) -> tuple[int, Outcome | None]:
    """Run ``order``'s attempt with its environment; the `_worker` exit code it ended with and
    the outcome the agent is to commit (None: in the journal, or none)."""
    os.environ.update(order.env)
    try:
        spec = TaskSpec.from_bytes(order.spec, "task spec")
    except (CorruptRecord, SnapshotError, OSError) as exc:
        print(f"supervise task worker: {exc}", file=sys.stderr)
        return CANNOT_RUN, None
    journal = _AttemptJournal(order.fresh)
    code = _run(order, spec, journal)
    return code, journal.outcome_for_agent if code in (0, 1) else None


def _run(order: Order, spec: TaskSpec, journal: _AttemptJournal) -> int:
    try:
        with using(parent_from_env(os.environ)):  # steps: children of the runner's attempt
            return trio.run(run_one, spec, order.attempt, order.node, journal)
    except BaseException as exc:  # e.g. a refused commit, out of the attempt's nursery
        error = journal_error(exc)
        if error is None:
            raise
        print(f"supervise task worker: {error}", file=sys.stderr)
        return CANNOT_RUN
    finally:
        journal.close()


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
            code, outcome = _attempt(msg)
        finally:  # the next attempt starts from the worker's own environment
            _restore(baseline)
            with contextlib.suppress(OSError):
                os.chdir(cwd)
            sys.stdout.flush()
            sys.stderr.flush()
        ran += 1
        if code not in (0, 1):  # stopped (STOPPED) or could not run: not reused
            return code
        sock.sendall(encode(Done(code, outcome)))


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
