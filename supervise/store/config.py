"""Which store to use: ``embedded`` or ``etcd://HOST:PORT[,HOST:PORT...]`` (``etcd+https://``
with a CA and an optional client certificate), and the job whose keys it holds."""

from __future__ import annotations

import enum
import re
import ssl
from pathlib import Path
from typing import Final

import attrs

from supervise.snapshot.persist import check_job
from supervise.store.errors import BadStoreUrl

#: The default ``--store``.
EMBEDDED: Final = "embedded"
#: The default ``--job``.
DEFAULT_JOB: Final = "default"
#: Every key of a job lives under this root (then the job id).
KEY_ROOT: Final = "/supervise/"
#: Seconds one request to etcd may take before the store counts as unavailable.
DEFAULT_TIMEOUT_S: Final = 5.0

_HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


class StoreKind(enum.StrEnum):
    """A store backend."""

    EMBEDDED = "embedded"
    ETCD = "etcd"


class Scheme(enum.StrEnum):
    """URL schemes of an etcd store."""

    ETCD = "etcd"
    ETCD_HTTPS = "etcd+https"


@attrs.frozen(slots=True)
class StoreConfig:
    """A parsed ``--store`` (build it with `parse_store_url`, which checks everything)."""

    kind: StoreKind
    endpoints: tuple[str, ...] = ()  # host:port, in the order given
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    job: str = DEFAULT_JOB
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def prefix(self) -> str:
        """The job's key prefix, ``/supervise/<job>/``."""
        return f"{KEY_ROOT}{self.job}/"

    @property
    def base_urls(self) -> tuple[str, ...]:
        """The gateway's base URLs, one per endpoint."""
        scheme = "https" if self.tls else "http"
        return tuple(f"{scheme}://{endpoint}" for endpoint in self.endpoints)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``etcd+https`` (CA, client certificate), None for plain etcd."""
        if not self.tls:
            return None
        url = f"{Scheme.ETCD_HTTPS}://{','.join(self.endpoints)}"
        try:
            context = ssl.create_default_context(cafile=None if self.ca is None else self.ca)
            if self.cert is not None:
                context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise BadStoreUrl(url, f"TLS files unusable: {exc}") from None
        return context


def parse_store_url(
    url: str,
    *,
    job: str = DEFAULT_JOB,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> StoreConfig:
    """Check a ``--store`` value and its companions; `BadStoreUrl` (one line) if unusable."""
    try:
        check_job(job)
    except ValueError as exc:
        raise BadStoreUrl(url, str(exc)) from None
    if not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise BadStoreUrl(url, f"timeout {timeout_s!r}: must be seconds > 0")
    tls_files = {"--store-ca": ca, "--store-cert": cert, "--store-key": key}
    if url == EMBEDDED:
        _no_tls(url, tls_files)
        return StoreConfig(StoreKind.EMBEDDED, job=job)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in {s.value for s in Scheme}:
        raise BadStoreUrl(url, "use 'embedded', etcd://HOST:PORT[,HOST:PORT...] or etcd+https://")
    tls = scheme == Scheme.ETCD_HTTPS
    if not tls:
        _no_tls(url, tls_files)
    rest = rest.removesuffix("/")
    if not rest:
        raise BadStoreUrl(url, "no endpoint: give HOST:PORT[,HOST:PORT...]")
    if "/" in rest or "?" in rest or "@" in rest:
        raise BadStoreUrl(url, "only HOST:PORT endpoints, without a path, query or user")
    endpoints = tuple(_endpoint(url, part) for part in rest.split(","))
    if len(set(endpoints)) != len(endpoints):
        raise BadStoreUrl(url, "an endpoint is listed twice")
    if (cert is None) != (key is None):
        raise BadStoreUrl(url, "--store-cert and --store-key go together")
    paths = {flag: _file(url, flag, value) for flag, value in tls_files.items()}
    return StoreConfig(
        StoreKind.ETCD,
        endpoints,
        tls=tls,
        ca=paths["--store-ca"],
        cert=paths["--store-cert"],
        key=paths["--store-key"],
        job=job,
        timeout_s=float(timeout_s),
    )


def _no_tls(url: str, tls_files: dict[str, str | Path | None]) -> None:
    given = [flag for flag, value in tls_files.items() if value is not None]
    if given:
        raise BadStoreUrl(url, f"{', '.join(given)} need an etcd+https:// store")


def _endpoint(url: str, part: str) -> str:
    host, sep, port = part.rpartition(":")
    if not sep or not host or not _HOST.fullmatch(host):
        raise BadStoreUrl(url, f"endpoint {part!r}: expected HOST:PORT")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadStoreUrl(url, f"endpoint {part!r}: port must be 1..65535")
    return f"{host}:{int(port)}"


def _file(url: str, flag: str, value: str | Path | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise BadStoreUrl(url, f"{flag} {str(path)!r}: no such file")
    return path
