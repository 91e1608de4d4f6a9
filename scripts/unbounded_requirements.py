"""The requirements ``scripts/check_latest.sh`` installs, and the lock it writes.

    python scripts/unbounded_requirements.py           pyproject's dependencies + the dev extra, upper bounds lifted
    python scripts/unbounded_requirements.py --freeze  constraints.txt for the environment this Python runs in

Standard library only: it runs in a bare virtual environment, before anything is installed.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# Installed by the set-up commands but not pins of ours: the installer itself, and the project.
UNPINNED = {"pip", "setuptools", "wheel", "forethought"}
LOCK_HEADER = """\
# The exact versions the test suite passed with (Linux, Python {python}). The README's set-up commands and
# .ci/run install with `-c constraints.txt`; pyproject.toml keeps ranges for library users.
# Refresh: scripts/check_latest.sh --lock (installs the newest releases, runs the suite, rewrites this file on
# success), review the diff, commit; docs/dependencies.md.
# torch is pinned without a build label: PyPI's CUDA build and PyTorch's +cpu build both satisfy it.
"""


def unbounded(requirement: str) -> str:
    """``requirement`` without its upper bounds: "transformers>=5.9,<5.26" → "transformers>=5.9"."""
    match = re.fullmatch(r"\s*([A-Za-z0-9_.\-\[\],]+?)\s*((?:[<>=!~]=?[^,;]+,?\s*)*)(;.*)?", requirement)
    if match is None:
        raise SystemExit(f"unbounded_requirements.py: cannot read the requirement {requirement!r}")
    name, specifiers, marker = match.group(1), match.group(2) or "", match.group(3) or ""
    kept = [s.strip() for s in specifiers.split(",") if s.strip() and not s.strip().startswith("<")]
    return name + ",".join(kept) + marker


def requirements() -> list[str]:
    """pyproject.toml's dependencies and dev extra, upper bounds lifted."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [unbounded(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def freeze() -> str:
    """constraints.txt for this environment: every installed distribution at its version, build labels dropped."""
    pins = {}
    for distribution in metadata.distributions():
        name = re.sub(r"[-_.]+", "-", distribution.metadata["Name"]).lower()
        if name not in UNPINNED:
            pins[name] = distribution.version.split("+")[0]
    python = ".".join(map(str, sys.version_info[:2]))
    return LOCK_HEADER.format(python=python) + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


if __name__ == "__main__":
    if sys.argv[1:] == ["--freeze"]:
        sys.stdout.write(freeze())
    elif not sys.argv[1:]:
        sys.stdout.write("".join(f"{r}\n" for r in requirements()))
    else:
        raise SystemExit("usage: python scripts/unbounded_requirements.py [--freeze]")
