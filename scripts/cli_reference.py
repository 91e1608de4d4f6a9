"""Write the command-line reference — the parser's help for every command — into docs/cli.md.

    python scripts/cli_reference.py           # rewrite it (after changing a config, a flag or a docstring)
    python scripts/cli_reference.py --check   # only say whether it is current (exit 1 if stale)

A maintainer's tool, not a user command; tests/analyses/test_cli.py fails when the reference is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from forethought.analyses.cli import cli_reference

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
START, END = "<!-- cli-reference: written by scripts/cli_reference.py -->", "<!-- /cli-reference -->"


def split_page(text: str) -> tuple[str, str, str]:
    """(before, the reference, after) of docs/cli.md."""
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE} lacks the markers {START} … {END}")
    head, rest = text.split(START, 1)
    current, tail = rest.split(END, 1)
    return head, current, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the reference is current")
    check = parser.parse_args().check
    head, current, tail = split_page(PAGE.read_text())
    wanted = f"\n{cli_reference()}\n"
    if check:
        print(f"{PAGE.name}'s command-line reference is " + ("current" if current == wanted else "stale"))
        return int(current != wanted)
    PAGE.write_text(head + START + wanted + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
