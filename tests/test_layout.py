"""The house's floors: data flows core → models → probes → analyses, experiments are siblings on shared plumbing,
and everything installs under one name, ``forethought``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("core", "models", "probes", "analyses")  # installed as forethought.core, forethought.models, …


def imported(path: Path) -> set[str]:
    """The workbench modules ``path`` imports, without the ``forethought.`` prefix (``from forethought.a.b import
    c`` → ``a.b``; ``import forethought.a.b`` → ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    ours = {name.removeprefix("forethought.") for name in names if name.startswith("forethought.")}
    return {name for name in ours if name.split(".")[0] in FLOORS}


def modules(floor: str) -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts): path for path in (ROOT / floor).rglob("*.py")}


def experiments() -> set[str]:
    """The modules whose ``run_*`` the command line runs: one per experiment."""
    from forethought.analyses.cli import COMMANDS

    runs = (command.run.partition(":") for command in COMMANDS.values())
    return {module.removeprefix("forethought.") for module, _, name in runs if name.startswith("run_")} - {
        "analyses.cli"}  # `figures` runs the others


def test_no_import_runs_back_up_a_floor():
    for level, floor in enumerate(FLOORS):
        for name, path in modules(floor).items():
            upward = {module for module in imported(path) if FLOORS.index(module.split(".")[0]) > level}
            assert not upward, f"{name} imports {sorted(upward)} from a floor above it"


def test_the_workbench_imports_itself_by_one_name():
    """No module imports a bare ``models``/``probes``/``analyses``/``core``: installed, only ``forethought`` exists."""
    for floor in FLOORS:
        for name, path in modules(floor).items():
            bare = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    bare.add(node.module)
                elif isinstance(node, ast.Import):
                    bare.update(alias.name for alias in node.names)
            assert not {n for n in bare if n.split(".")[0] in FLOORS}, f"{name} imports a floor without forethought."


def test_experiments_import_no_other_experiment():
    siblings = experiments()
    assert {"analyses.probe", "analyses.precache", "analyses.compare", "analyses.gap"} <= siblings
    for name, path in modules("analyses").items():
        if name == "analyses.cli":  # the command table names every experiment
            continue
        others = (imported(path) & siblings) - {name}
        assert not others, f"{name} imports the experiment(s) {sorted(others)}: move what they share into plumbing"


def test_a_users_own_models_and_probes_do_not_shadow_ours(tmp_path):
    """A notebook beside its own ``models.py`` and ``probes/`` package imports our workbench, and theirs too."""
    (tmp_path / "models.py").write_text("MINE = 'models'\n")
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / "__init__.py").write_text("MINE = 'probes'\n")
    script = ("import forethought as ft, models, probes; from forethought.models import myopic; "
              "print(ft.myopic is myopic.myopic, ft.Comparison.__module__, models.MINE, probes.MINE)")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "forethought.analyses.compare", "models", "probes"]


def test_every_name_of_the_user_api_resolves_to_what_its_module_defines():
    import forethought as ft
    from forethought.models.lm import LMCheckpoint

    assert set(ft.__all__) <= set(dir(ft))
    for name in ft.__all__:
        value = getattr(ft, name)
        assert getattr(value, "__name__", name) in (name, "load"), name  # the object, not a module or a stand-in
    assert ft.load_checkpoint == LMCheckpoint.load and ft.TrainSettings.__module__ == "forethought.models.train"
    with pytest.raises(AttributeError, match="no attribute 'HookedTransformer'"):
        ft.HookedTransformer  # noqa: B018


def test_probing_experiments_are_writers_over_the_one_engine():
    """probe, precache and compare run on analyses.engine; none builds its own caches or probe grids."""
    for name in ("probe", "precache", "compare"):
        imports = imported(ROOT / "analyses" / f"{name}.py")
        assert "analyses.engine" in imports, f"analyses.{name} does not use the probing engine"
        assert not imports & {"probes.cache", "probes.store"}, f"analyses.{name} caches or fits probes itself"
