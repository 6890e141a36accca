"""A transport's counters: what it received, sent, dropped and refused (health checks, tests)."""

from __future__ import annotations

from collections import Counter

import attrs


@attrs.define(slots=True)
class TransportStats:
    """Counters for health checks and tests."""

    received: int = 0
    sent: int = 0
    dropped: Counter[str] = attrs.field(factory=Counter)
    auth_refused: int = 0  # handshakes refused: ZAP denials, CURVE missing or broken
    refused: Counter[str] = attrs.field(factory=Counter)  # by message kind: not allowed
    links_closed: int = 0  # connections libzmq closed (peer gone, over-size or bad frames)
    handler_errors: int = 0
