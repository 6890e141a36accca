"""The etcd v3 backend, through etcd's JSON gateway with httpx under trio.

No trio-native etcd client exists and the popular ``etcd3`` package no longer imports with
current protobuf; the gateway (``/v3/kv/*``, ``/v3/lease/*``, ``/v3/watch``) is part of every
etcd server since 3.3 and needs only HTTP. Requests go to the endpoint that answered last and
fail over to the next one; when none answers, `StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import trio

from supervise.store import _gateway as gw
from supervise.store.base import Store
from supervise.store.config import StoreConfig
from supervise.store.errors import (
    RETRYABLE_CODES,
    Code,
    Compacted,
    StoreRejected,
    StoreUnavailable,
)
from supervise.store.records import Compare, Event, Op, Snapshot, TxnResult

# httpx logs every request at INFO: a lease renewal three times per TTL would flood the log.
for _chatty in ("httpx", "httpcore"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)


class EtcdStore(Store):
    """A client of one etcd cluster (any of ``config.endpoints``)."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._urls = config.base_urls
        self._current = 0
        context = config.ssl_context()
        self._client = httpx.AsyncClient(
            verify=context if context is not None else True,
            timeout=httpx.Timeout(config.timeout_s),
            headers={"Content-Type": "application/json"},
        )

    @property
    def endpoint(self) -> str:
        """The base URL that answered last."""
        return self._urls[self._current]

    async def range(self, key: str, *, prefix: bool = False) -> Snapshot:
        body = await self._call("/v3/kv/range", gw.key_range(key, prefix), "range")
        return Snapshot(gw.records(body), gw.revision(body))

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        body = await self._call("/v3/kv/txn", gw.txn(compare, success, failure), "txn")
        return TxnResult(bool(body.get("succeeded")), gw.revision(body), gw.reads(body))

    async def grant(self, ttl_s: int) -> int:
        body = await self._call("/v3/lease/grant", {"TTL": str(ttl_s)}, "lease grant")
        return gw.integer(body, "ID")

    async def keepalive(self, lease: int) -> int:
        body = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, "lease keepalive")
        return gw.integer(body.get("result", body), "TTL")

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, "lease revoke")
        except StoreRejected as exc:
            if exc.code != Code.NOT_FOUND:
                raise

    async def compact(self, revision: int) -> None:
        body = {"revision": str(revision), "physical": True}
        await self._call("/v3/kv/compaction", body, "compaction")

    @asynccontextmanager
    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int = 0
    ) -> AsyncIterator[AsyncIterator[tuple[Event, ...]]]:
        stream = _WatchStream(self, gw.key_range(key, prefix), start_revision)
        try:
            await stream.open()
            batches = stream.batches()
            try:
                yield batches
            finally:
                await batches.aclose()
        finally:
            await stream.close()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- requests --------------------------------------------------------------------------

    async def _call(self, path: str, body: gw.Json, what: str) -> gw.Json:
        """POST ``body`` to the first endpoint that answers, starting at the current one."""
        failures = []
        first = self._current  # read once: concurrent calls move it as they fail over
        for attempt in range(len(self._urls)):
            index = (first + attempt) % len(self._urls)
            url = self._urls[index]
            try:
                response = await self._client.post(url + path, content=json.dumps(body))
                answer = _decode(response, what)
            except (httpx.TransportError, _Retry) as exc:
                failures.append(f"{url}: {_reason(exc)}")
                continue
            self._current = index
            return answer
        raise StoreUnavailable(what, "; ".join(failures))


class _Retry(Exception):
    """An endpoint answered "try elsewhere or later" (no leader, overloaded, deadline)."""


def _reason(exc: BaseException) -> str:
    """One line: the exception's type and the first message along its cause chain (httpx's
    own messages are often empty; the TLS or socket error below says what went wrong)."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).strip()
        if text:
            return f"{type(exc).__name__}: {text.splitlines()[0]}"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _decode(response: httpx.Response, what: str) -> gw.Json:
    """The JSON body of a gateway answer; `StoreRejected` or `_Retry` for an error body."""
    try:
        body = response.json()
    except ValueError:
        if response.status_code >= 500:
            raise _Retry(f"HTTP {response.status_code}") from None
        text = response.text.strip().splitlines()[0] if response.text.strip() else ""
        raise StoreRejected(what, response.status_code, text or "not JSON") from None
    if not isinstance(body, dict):
        raise StoreRejected(what, response.status_code, "not a JSON object")
    error = body.get("error") or (body.get("result") or {}).get("error")
    if error is not None:
        err = error if isinstance(error, dict) else body
        code = int(err.get("code", 0) or err.get("grpc_code", 0) or 0)
        message = str(err.get("message") or err.get("error") or error)
        if code in RETRYABLE_CODES:
            raise _Retry(message)
        raise StoreRejected(what, code, message)
    return body


class _WatchStream:
    """One watch, kept open across endpoint failures: it resumes from the next revision."""

    def __init__(self, store: EtcdStore, key_range: gw.Json, start_revision: int) -> None:
        self._store = store
        self._range = key_range
        self._next = start_revision
        self._stack: AsyncExitStack | None = None
        self._lines: AsyncIterator[str] | None = None
        self._url = ""

    async def open(self, broken: str | None = None) -> None:
        """Open the stream on the first endpoint that accepts it, from the store's current
        one; ``broken`` (the endpoint whose stream just broke) is tried last."""
        urls = self._store._urls
        first = self._store._current
        order = [urls[(first + i) % len(urls)] for i in range(len(urls))]
        if broken in order:
            order.remove(broken)
            order.append(broken)
        failures = []
        for url in order:
            try:
                await self._open_at(url)
            except (httpx.TransportError, _Retry) as exc:
                failures.append(f"{url}: {_reason(exc)}")
                await self.close()
                continue
            self._url = url
            return
        raise StoreUnavailable("watch", "; ".join(failures))

    async def _open_at(self, url: str) -> None:
        request: dict[str, Any] = {"create_request": {**self._range}}
        if self._next:
            request["create_request"]["start_revision"] = str(self._next)
        stack = AsyncExitStack()
        self._stack = stack
        timeout = httpx.Timeout(self._store.config.timeout_s, read=None)
        response = await stack.enter_async_context(
            self._store._client.stream(
                "POST", url + "/v3/watch", content=json.dumps(request), timeout=timeout
            )
        )
        if response.status_code != 200:
            await response.aread()
            _decode(response, "watch")
            raise _Retry(f"HTTP {response.status_code}")
        self._lines = response.aiter_lines()
        created = await self._result()
        if created is None:
            raise _Retry("the watch stream ended before it was created")
        self._check_canceled(created)
        if self._next == 0:  # "from now": the next revision after the one it was created at
            self._next = gw.revision(created) + 1

    async def _result(self) -> gw.Json | None:
        assert self._lines is not None
        async for line in self._lines:
            if not line.strip():
                continue
            body = json.loads(line)
            if "error" in body:
                _decode(httpx.Response(200, json=body), "watch")
            result: gw.Json = body.get("result", {})
            return result
        return None

    def _check_canceled(self, result: gw.Json) -> None:
        compact = gw.integer(result, "compact_revision")
        if compact:
            raise Compacted(self._next, compact)
        if result.get("canceled"):
            raise StoreRejected("watch", 0, str(result.get("cancel_reason") or "canceled"))

    async def batches(self) -> AsyncGenerator[tuple[Event, ...], None]:
        """Event batches; reconnects (from the next revision) when the stream breaks."""
        while True:
            try:
                result = await self._result()
                if result is None:
                    raise _Retry("the watch stream ended")
            except (httpx.TransportError, _Retry):
                await self.close()
                await self.open(broken=self._url)
                continue
            self._check_canceled(result)
            events = tuple(gw.event(e) for e in result.get("events", ()))
            if events:
                self._next = events[-1].revision + 1
                yield events

    async def close(self) -> None:
        """Close the HTTP stream (idempotent)."""
        stack, self._stack, lines, self._lines = self._stack, None, self._lines, None
        if lines is not None:
            await _unwind(lines)
        if stack is not None:
            await stack.aclose()


async def _unwind(lines: AsyncIterator[str]) -> None:
    """End httpx's chain of line/text/byte generators by an exception running through it (a
    cancelled read), so none is left half-consumed for the garbage collector to finalize."""
    with trio.CancelScope() as scope:
        scope.cancel()
        with contextlib.suppress(Exception):
            while True:
                await anext(lines)
