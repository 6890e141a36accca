"""A node's life in names: the executor's states, the restart progress it reports, how it
ends, and the node agent's exit codes (one definition each, shared by every agents module)."""

from __future__ import annotations

import enum
from typing import Final

import attrs

#: `run_node`'s exit code when the node's own supervision tree gave up (internal failure).
EXIT_INTERNAL: Final = 1
#: Exit code of a node whose recovery gave up (exhausted, or the policy said stop).
EXIT_GAVE_UP: Final = 3

#: ``Restart.trigger`` of the cluster's first start (every other restart names its `Trigger`).
CLUSTER_START: Final = "start"


class ExecutorState(enum.StrEnum):
    """Where a node's executor is (heartbeat info ``state``, ``supervise status``)."""

    JOINING = "joining"  # no workers yet
    STARTING = "starting"  # a Restart arrived: fetching, spawning, restoring
    RUNNING = "running"  # every local worker completed a step
    RECOVERING = "recovering"  # workers stopped for a restart (Prepare)
    FINISHED = "finished"  # every local worker exited 0
    GAVE_UP = "gave_up"  # the coordinator's GiveUp

    @property
    def ended(self) -> bool:
        """Finished or gave up: nothing more to start, lead or report."""
        return self in (ExecutorState.FINISHED, ExecutorState.GAVE_UP)


class RestartProgress(enum.StrEnum):
    """``Progress.phase``: how far a node's side of one restart got."""

    ACCEPTED = "accepted"  # the node took the Restart
    STARTED = "started"  # workers spawned
    RESTORED = "restored"  # every local rank loaded its shard
    RESUMED = "resumed"  # every local rank completed a step
    FAILED = "failed"  # ``Progress.detail`` says why


@attrs.frozen(slots=True)
class Ended:
    """How a node's executor ended (finished or gave up: its `state` says which): `Executor.run`
    returns it; the node exits with the code."""

    exit_code: int
