"""The command tables of README.md and docs/node.md list every `supervise` subcommand and every
option it takes, so a flag added to the CLI cannot go missing from the docs."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervise.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every leaf command (``("policy", "check")``...) with its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _commands(child, (*path, name))


def _rows(page: str) -> dict[str, str]:
    """Each table row whose first cell is a `supervise ...` command, by its command words."""
    rows: dict[str, str] = {}
    for line in (ROOT / page).read_text().splitlines():
        found = re.match(r"\| `supervise ((?:[a-z]+ ?)+)", line)
        if found:
            rows[found[1].strip()] = line.split("` |")[0]
    return rows


@pytest.mark.parametrize("page", ["README.md", "docs/node.md"])
def test_the_command_tables_list_every_command_and_option(page: str) -> None:
    rows = _rows(page)
    for path, parser in _commands(build_parser()):
        name = " ".join(path)
        assert name in rows, f"{page}: no row for `supervise {name}`"
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert any(
                re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", rows[name])
                for o in action.option_strings
            ), f"{page}: `supervise {name}` row lacks {'/'.join(action.option_strings)}"
