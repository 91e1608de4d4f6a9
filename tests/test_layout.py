"""The house's floors: data flows models → probes → analyses, and experiments are siblings on shared plumbing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("models", "probes", "analyses")


def imported(path: Path) -> set[str]:
    """The workbench modules ``path`` imports (``from a.b import c`` → ``a.b``; ``import a.b`` → ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] in FLOORS}


def modules(floor: str) -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts): path for path in (ROOT / floor).rglob("*.py")}


def experiments() -> set[str]:
    """The modules whose ``run_*`` the command line runs: one per experiment."""
    tree = ast.parse((ROOT / "analyses" / "cli.py").read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
            and any(alias.name.startswith("run_") for alias in node.names)}


def test_no_import_runs_back_up_a_floor():
    for level, floor in enumerate(FLOORS):
        for name, path in modules(floor).items():
            upward = {module for module in imported(path) if FLOORS.index(module.split(".")[0]) > level}
            assert not upward, f"{name} imports {sorted(upward)} from a floor above it"


def test_experiments_import_no_other_experiment():
    siblings = experiments()
    assert {"analyses.probe", "analyses.precache", "analyses.compare", "analyses.gap"} <= siblings
    for name, path in modules("analyses").items():
        if name in ("analyses.cli", "analyses.__main__"):  # the command table names every experiment
            continue
        others = (imported(path) & siblings) - {name}
        assert not others, f"{name} imports the experiment(s) {sorted(others)}: move what they share into plumbing"
