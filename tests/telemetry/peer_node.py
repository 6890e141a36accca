"""A second "node" for the collector test: joins a recovery from the carrier in argv[1],
runs its phases, logs inside them, and flushes its telemetry to OTEL_* at exit."""

import json
import sys

import structlog

import supervise as sv
from supervise.telemetry import RecoveryTrace


def main() -> int:
    sv.configure_logging(level="INFO")  # stderr is a pipe: JSON lines
    sv.setup_telemetry(rank=1)
    log = structlog.get_logger("peer_node")
    rt = RecoveryTrace.join(json.loads(sys.argv[1]), rank=1, trigger="peer_lost")
    with rt.phase("fetch", snapshot_source="peer", snapshot_version=40) as op:
        log.info("fetching shard", peer_rank=0)
        op.set(bytes=4096)
    with rt.phase("restore", snapshot_source="peer", bytes=4096):
        pass
    with rt.phase("resume"):
        log.info("first step completed", step=41)
    return 0 if sv.shutdown_telemetry(timeout_s=30) else 3


if __name__ == "__main__":
    sys.exit(main())
