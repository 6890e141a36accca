"""The ``--store``/``--job``/``--store-ca``/``--store-cert``/``--store-key`` flags, read once for
every command that takes them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervise.store import StoreConfig


def store_from_args(args: argparse.Namespace) -> StoreConfig:
    """The store the flags name, its TLS files loaded now (unusable ones are a one-line
    `BadStoreUrl` here, not at the first call)."""
    from supervise.store import DEFAULT_JOB, parse_store_url

    config = parse_store_url(
        args.store,
        job=args.job or DEFAULT_JOB,
        ca=args.store_ca,
        cert=args.store_cert,
        key=args.store_key,
    )
    config.ssl_context()
    return config
