"""`supervise policy check FILE...` and `supervise policy show [FILE]`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]

_STDIN = "-"


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the ``policy`` command and its ``check`` / ``show`` subcommands."""
    policy = commands.add_parser(
        "policy",
        help="check and show declarative policies (TOML)",
        description="Check and show declarative policies (TOML files, see policies/).",
    )
    policy.set_defaults(handler=lambda _args: _usage(policy))
    sub = policy.add_subparsers(title="subcommands", metavar="SUBCOMMAND")

    check = sub.add_parser(
        "check",
        help="validate policy files; exit 0 when all are valid, 2 otherwise",
        description="Validate policy files: one line per problem, exit 0 when all are valid, "
        "2 otherwise. '-' reads standard input.",
    )
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    check.set_defaults(handler=_check)

    show = sub.add_parser(
        "show",
        help="print a policy as normalized TOML, every default filled in",
        description="Print the policy in FILE (the default policy without one) as normalized "
        "TOML with every default filled in. '-' reads standard input.",
    )
    show.add_argument("file", nargs="?", metavar="FILE")
    show.set_defaults(handler=_show)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _load(name: str) -> Any:
    from supervise.policy import Policy
    from supervise.policy._load import MAX_FILE_BYTES

    if name == _STDIN:
        data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        return Policy.from_toml_text(data, source="<stdin>")
    return Policy.from_toml(name)


def _check(args: argparse.Namespace) -> int:
    from supervise.policy import PolicyError

    status = 0
    for name in args.files:
        try:
            _load(name)
        except PolicyError as e:
            status = 2
            for problem in e.problems:
                print(problem)
        else:
            if not args.quiet:
                print(f"{'<stdin>' if name == _STDIN else name}: ok")
    return status


def _show(args: argparse.Namespace) -> int:
    from supervise.policy import Policy, PolicyError

    if args.file is None:
        policy, header = Policy.default(), "the default policy"
    else:
        try:
            policy = _load(args.file)
        except PolicyError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return 2
        header = f"normalized from {'<stdin>' if args.file == _STDIN else args.file}"
    sys.stdout.write(policy.to_toml(header=(f"supervise policy: {header}",)))
    return 0
