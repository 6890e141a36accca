"""The `supervise` command: a thin dispatcher; each subcommand lives in its own module.

A subcommand module (``supervise/cli/<name>.py``) exposes ``register(commands)``, which adds its
parser and sets ``handler`` (``args -> exit status``). Add new ones to `COMMANDS`; keep their
heavy imports inside the handler so that ``supervise --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from supervise._version import __version__
from supervise.cli import demo, keys, node, policy, status, tasks

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[ModuleType, ...] = (node, demo, status, tasks, policy, keys)
"""Modules that register a subcommand, in the order `--help` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="supervise",
        description="Erlang/OTP-style supervision for distributed PyTorch training.",
    )
    parser.add_argument("--version", action="version", version=f"supervise {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    0: done / valid; 2: bad input or usage; 1: an internal error (reported in one line; set
    SUPERVISE_DEBUG=1 for the traceback); 130: interrupted.
    """
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version exit 0, usage errors exit 2
        return e.code if isinstance(e.code, int) else 2
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status: int = handler(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `supervise policy show x | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:
        if os.environ.get("SUPERVISE_DEBUG"):
            raise
        print(
            f"supervise: internal error: {type(e).__name__}: {e} (SUPERVISE_DEBUG=1 shows more)",
            file=sys.stderr,
        )
        return 1
    return status
