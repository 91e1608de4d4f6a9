"""Write the flags of every command (analyses/cli.json, what the command line builds its parser from) and the
command-line reference — the parser's help for every command — into docs/cli.md.

    python scripts/cli_reference.py           # rewrite both (after changing a config, a flag or a docstring)
    python scripts/cli_reference.py --check   # only say whether they are current (exit 1 if stale)

A maintainer's tool, not a user command; tests/analyses/test_cli.py fails when either is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from forethought.analyses.cli import SPEC_FILE, cli_reference, command_specs

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
    specs = command_specs()
    spec_text = spec_json(specs)
    head, current, tail = split_page(PAGE.read_text())
    wanted = f"\n{cli_reference(specs)}\n"
    stale = [path.name for path, now, then in ((SPEC_FILE, spec_text, _read(SPEC_FILE)), (PAGE, wanted, current))
             if now != then]
    if check:
        print(f"stale: {', '.join(stale)}" if stale else f"{SPEC_FILE.name} and {PAGE.name} are current")
        return int(bool(stale))
    SPEC_FILE.write_text(spec_text)
    PAGE.write_text(head + START + wanted + END + tail)
    return 0


def spec_json(specs: dict) -> str:
    """``cli.json``'s text: one command a block, one flag a line."""
    def dumped(value) -> str:
        return json.dumps(value, ensure_ascii=False)

    blocks = [f" {dumped(name)}: {{\"description\": {dumped(spec['description'])}, \"flags\": [\n"
              + ",\n".join(f"  {dumped(list(flag))}" for flag in spec["flags"]) + "\n ]}"
              for name, spec in specs.items()]
    return "{\n" + ",\n".join(blocks) + "\n}\n"


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


if __name__ == "__main__":
    sys.exit(main())
