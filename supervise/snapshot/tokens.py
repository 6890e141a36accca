"""Worker tokens: the credential that binds a worker's requests to its rank at the node agent.

The agent issues one random token per local rank and generation when it starts (or wakes a
spare for) that rank's worker, and hands it over in the worker's environment
(``SUPERVISE_AGENT_TOKEN``). Every request carries it; the agent serves a request only for
the rank its token was issued to, so a worker of another rank, or a process without a worker's
environment, cannot commit, drop or report anything for a rank. A new generation's token
replaces the rank's previous one (a leftover worker of an old generation is refused too). Not
a boundary against a hostile process of the same user: it can read a worker's environment
(``/proc/<pid>/environ``) and act for that worker's rank (docs/node.md says so).
"""

from __future__ import annotations

import hashlib
import secrets
import threading

import attrs

_TOKEN_BYTES = 32


@attrs.frozen(slots=True)
class Grant:
    """Who a token speaks for: one rank, in one generation."""

    rank: int
    generation: int


class RankTokens:
    """The tokens issued to this node's workers, one valid token per rank. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[int, bytes] = {}  # rank -> the digest of its current token
        self._grants: dict[bytes, Grant] = {}  # digest of a current token -> its grant

    def issue(self, rank: int, generation: int) -> str:
        """A fresh token for ``rank`` in ``generation``; the rank's previous one stops working."""
        if rank < 0 or generation < 0:
            raise ValueError(f"rank {rank} and generation {generation} must be >= 0")
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        key = _digest(token)
        with self._lock:
            old = self._tokens.get(rank)
            if old is not None:
                self._grants.pop(old, None)
            self._tokens[rank] = key
            self._grants[key] = Grant(rank, generation)
        return token

    def revoke(self, rank: int) -> None:
        """``rank``'s token stops working (a farm node gives a finished task's shard back)."""
        with self._lock:
            old = self._tokens.pop(rank, None)
            if old is not None:
                self._grants.pop(old, None)

    def grant(self, token: str) -> Grant | None:
        """Whom ``token`` speaks for (None: no valid token). Looked up by its SHA-256 digest:
        a lookup's timing tells nothing usable about a token, and it costs the same however
        many ranks (a farm node: one per task) hold tokens."""
        if not token:
            return None
        key = _digest(token)
        with self._lock:
            return self._grants.get(key)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
