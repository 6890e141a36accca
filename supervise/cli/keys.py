"""`supervise keys generate DIR --nodes N`: CURVE key pairs for every node and the CLI client."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``keys`` command and its ``generate`` subcommand."""
    keys = commands.add_parser(
        "keys",
        help="CURVE keys that authenticate and encrypt links between node agents",
        description="Manage the CURVE key files used with `curve = true` in [replication].",
    )
    keys.set_defaults(handler=lambda _args: _usage(keys))
    sub = keys.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    gen = sub.add_parser(
        "generate",
        help="write key pairs for nodes 0..N-1 and a 'client' key pair into DIR",
        description="Write node-R.key / node-R.key_secret for R in 0..N-1, plus client.key / "
        "client.key_secret (for `supervise status`), into DIR. Copy the directory to every "
        "node and set replication.curve_keys to it. Secret files are created with mode 0600.",
    )
    gen.add_argument("directory", metavar="DIR")
    gen.add_argument("--nodes", type=int, required=True, metavar="N", help="number of nodes")
    gen.add_argument(
        "--client",
        action="append",
        default=None,
        metavar="NAME",
        help="client key name (repeatable; default: client)",
    )
    gen.add_argument("--force", action="store_true", help="overwrite existing key files")
    gen.set_defaults(handler=_generate)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _generate(args: argparse.Namespace) -> int:
    from supervise.cluster.errors import CurveKeyError
    from supervise.cluster.keys import generate_keys

    clients = tuple(args.client) if args.client else ("client",)
    try:
        files = generate_keys(args.directory, args.nodes, clients=clients, overwrite=args.force)
    except CurveKeyError as exc:
        print(f"supervise keys generate: {exc}", file=sys.stderr)
        return 2
    pairs = len(files) // 2
    print(
        f"wrote {pairs} key pairs to {args.directory} ({args.nodes} nodes, clients: "
        f"{', '.join(clients)})"
    )
    return 0
