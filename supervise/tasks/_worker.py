"""A task worker process: ``python -m supervise.tasks._worker TASK_DIR ATTEMPT NODE``.

Runs one attempt of the task whose spec is ``TASK_DIR/spec.rec`` against its journal: in the
RAM of the process serving ``SUPERVISE_AGENT`` (shard ``SUPERVISE_TASK_SHARD``) when set,
else in ``TASK_DIR/journal``. Exit 0: returned; 1: raised (both recorded in the journal as the
outcome); 2: could not even start (bad arguments or spec); 3: stopped by SIGTERM (a pause,
a cancel, a shutdown) after committing the steps it had finished — a step running in a thread
is let finish first, so the stop waits for it (up to the runner's ``shutdown`` grace).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import trio

from supervise.snapshot.client import AGENT_ENV, AgentClient
from supervise.snapshot.errors import SnapshotError
from supervise.tasks.arena_journal import ArenaJournal
from supervise.tasks.attempt import BadTarget, failure, resolve, run_attempt
from supervise.tasks.context import TaskContext
from supervise.tasks.journal import CorruptRecord, DiskJournal, Journal
from supervise.tasks.layout import FENCE_ENV, JOURNAL_DIR, SHARD_ENV, SPEC_FILE
from supervise.tasks.spec import TaskSpec
from supervise.tasks.telemetry import parent_from_env
from supervise.telemetry import TelemetryError, setup_telemetry, shutdown_telemetry, using

STOPPED = 3
"""Exit code of a worker stopped by SIGTERM after committing what its attempt had done."""


async def _main(task_dir: Path, attempt: int, node: str) -> int:
    spec = TaskSpec.from_bytes((task_dir / SPEC_FILE).read_bytes(), str(task_dir / SPEC_FILE))
    return await run_one(spec, attempt, node, _journal(task_dir))


async def run_one(spec: TaskSpec, attempt: int, node: str, journal: Journal) -> int:
    """Run attempt ``attempt`` of ``spec`` against ``journal`` in this trio run; the exit code
    of a one-attempt worker (0 returned, 1 raised, `STOPPED`: SIGTERM during the attempt)."""
    try:
        fn = resolve(spec.target, spec.args, spec.kwargs)
    except BadTarget as exc:
        journal.finish(failure(attempt, exc))
        print(f"supervise task worker: {exc}", file=sys.stderr)
        return 1
    ctx = TaskContext(
        task_id=spec.task_id,
        attempt=attempt,
        node=node,
        journal=journal,
        checkpoint=spec.policy.checkpoint,
    )
    stopped = False
    async with trio.open_nursery() as nursery:

        async def stop_on_sigterm(task_status: trio.TaskStatus[None]) -> None:
            nonlocal stopped
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                task_status.started()
                async for _ in signals:
                    stopped = True
                    nursery.cancel_scope.cancel()
                    return

        await nursery.start(stop_on_sigterm)
        outcome = await run_attempt(fn, ctx, spec.args, spec.kwargs)
        nursery.cancel_scope.cancel()
    if stopped:  # a pause, a cancel, a shutdown: commit what the attempt finished, then go
        with trio.CancelScope(shield=True):
            await ctx.checkpoint()
        return STOPPED
    return 0 if outcome.ok else 1


def _journal(task_dir: Path) -> Journal:
    """The journal in the host's RAM when the parent serves one, else in ``task_dir``."""
    if os.environ.get(AGENT_ENV, ""):
        return agent_journal()
    return DiskJournal(task_dir / JOURNAL_DIR)


def agent_journal() -> ArenaJournal:
    """The journal in the RAM of the process serving ``SUPERVISE_AGENT`` (the shard and fence
    from the environment; SnapshotError if they are not set right)."""
    endpoint = os.environ.get(AGENT_ENV, "")
    if endpoint:
        shard = os.environ.get(SHARD_ENV, "")
        if not shard.isdigit():
            raise SnapshotError(f"{SHARD_ENV}={shard!r}: must be the task's shard (>= 0)")
        fence = os.environ.get(FENCE_ENV, "") or "0"  # a farm attempt's fence: its versions'
        if not fence.isdigit():
            raise SnapshotError(f"{FENCE_ENV}={fence!r}: must be the attempt's fence (>= 0)")
        return ArenaJournal(AgentClient(endpoint, int(shard)), generation=int(fence))
    raise SnapshotError(f"{AGENT_ENV} is not set: no journal host to write to")


JOURNAL_ERRORS = (OSError, CorruptRecord, SnapshotError)
"""What leaves an attempt in doubt about its journal (it could not be read or written)."""


def journal_error(exc: BaseException) -> BaseException | None:
    """The first journal error ``exc`` is or holds when it holds nothing else (an attempt's
    nursery wraps e.g. a refused commit in an ExceptionGroup); None otherwise."""
    if isinstance(exc, JOURNAL_ERRORS):
        return exc
    if not isinstance(exc, BaseExceptionGroup):
        return None
    found, rest = exc.split(JOURNAL_ERRORS)
    if rest is not None or found is None:
        return None
    first: BaseException = found
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def main(argv: list[str]) -> int:
    """Run one attempt; the exit code says how it ended."""
    if len(argv) != 3 or not argv[1].isdigit() or int(argv[1]) < 1:
        print("usage: python -m supervise.tasks._worker TASK_DIR ATTEMPT NODE", file=sys.stderr)
        return 2
    try:  # OTEL_* of the environment: off (and free) unless it names a collector
        setup_telemetry()
    except TelemetryError as exc:  # the task runs all the same, untraced
        print(f"supervise task worker: telemetry off: {exc}", file=sys.stderr)
    try:
        with using(parent_from_env(os.environ)):  # steps: children of the runner's attempt
            return trio.run(_main, Path(argv[0]), int(argv[1]), argv[2])
    except BaseException as exc:
        error = journal_error(exc)
        if error is None:
            raise
        print(f"supervise task worker: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_telemetry(5.0)  # flush its step spans before the exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
