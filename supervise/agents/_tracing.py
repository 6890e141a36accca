"""Recovery-trace helpers for code that runs traced or not (a cluster start is untraced)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from supervise.telemetry import OperationSpan, Phase, RecoveryTrace, Source


def active(recovery: RecoveryTrace | None) -> contextlib.AbstractContextManager[None]:
    """``recovery`` is current (its trace id on log lines); None: no change."""
    return contextlib.nullcontext() if recovery is None else recovery.activate()


def joined(trace: Mapping[str, str], rank: int) -> contextlib.AbstractContextManager[None]:
    """The recovery named by a message's trace context is current (none: no change)."""
    if not trace:
        return contextlib.nullcontext()
    return RecoveryTrace.join(trace, rank=rank).activate()


@contextlib.contextmanager
def maybe_phase(
    recovery: RecoveryTrace | None, phase: Phase, **attributes: Any
) -> Iterator[OperationSpan | None]:
    """``recovery.phase(...)`` when traced; nothing (yields None) otherwise."""
    if recovery is None:
        yield None
        return
    with recovery.phase(phase, **attributes) as span:
        yield span


def slowest_source(sources: Iterable[str]) -> str:
    """The snapshot source attribute for several shards: the slowest tier involved."""
    seen = set(sources)
    for tier in (Source.DISK, Source.PEER):
        if tier in seen:
            return tier.value
    return Source.LOCAL.value
