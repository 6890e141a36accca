"""Where a task's files live in its directory (one place for the names)."""

from typing import Final

SPEC_FILE: Final = "spec.rec"
JOURNAL_DIR: Final = "journal"
