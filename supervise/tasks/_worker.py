"""A task worker process: ``python -m supervise.tasks._worker TASK_DIR ATTEMPT NODE``.

Runs one attempt of the task whose spec is ``TASK_DIR/spec.rec`` against the journal in
``TASK_DIR/journal``. Exit 0: returned; 1: raised (both recorded in the journal as the
outcome); 2: could not even start (bad arguments or spec).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from supervise.tasks.attempt import BadTarget, failure, resolve, run_attempt
from supervise.tasks.context import TaskContext
from supervise.tasks.journal import CorruptRecord, DiskJournal
from supervise.tasks.layout import JOURNAL_DIR, SPEC_FILE
from supervise.tasks.spec import TaskSpec


async def _main(task_dir: Path, attempt: int, node: str) -> int:
    spec = TaskSpec.from_bytes((task_dir / SPEC_FILE).read_bytes(), str(task_dir / SPEC_FILE))
    journal = DiskJournal(task_dir / JOURNAL_DIR)
    try:
        fn = resolve(spec.target)
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
    outcome = await run_attempt(fn, ctx, spec.args, spec.kwargs)
    return 0 if outcome.ok else 1


def main(argv: list[str]) -> int:
    """Run one attempt; the exit code says how it ended."""
    if len(argv) != 3 or not argv[1].isdigit():
        print("usage: python -m supervise.tasks._worker TASK_DIR ATTEMPT NODE", file=sys.stderr)
        return 2
    try:
        return trio.run(_main, Path(argv[0]), int(argv[1]), argv[2])
    except (OSError, CorruptRecord) as exc:
        print(f"supervise task worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
