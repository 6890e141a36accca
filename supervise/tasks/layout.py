"""Where a task's files live in its directory (one place for the names)."""

from typing import Final

SPEC_FILE: Final = "spec.rec"
JOURNAL_DIR: Final = "journal"
SHARD_ENV: Final = "SUPERVISE_TASK_SHARD"
"""The worker's shard (the arena service's rank) for its task's journal, with SUPERVISE_AGENT."""
FENCE_ENV: Final = "SUPERVISE_TASK_FENCE"
"""The fence of the worker's attempt on a farm (its journal versions carry it as generation)."""
