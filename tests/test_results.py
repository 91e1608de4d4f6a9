"""results/: the kept tables of the runs behind the README's numbers — each one readable, undamaged and traceable
to the code that made it — and scripts/keep_run.py, which keeps them."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from forethought.analyses.results import read_results, tidy, write_results
from forethought.core.errors import ForethoughtError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("keep_run", ROOT / "scripts" / "keep_run.py")
keep_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(keep_run)
KEPT_RUNS = sorted(path for path in (ROOT / "results").iterdir() if path.is_dir())


@pytest.mark.parametrize("run", KEPT_RUNS, ids=[path.name for path in KEPT_RUNS])
def test_every_kept_run_reads_undamaged_and_names_its_code(run):
    table, meta = read_results(run)  # its digest checked
    assert not table.empty and set(meta.get("digests", {})) >= {"results.parquet"}
    assert {path.name for path in run.iterdir()} <= set(keep_run.KEPT) and (run / "config.json").is_file()
    assert re.fullmatch(r"[0-9a-f]{40}", meta["git_revision"]) and meta["threads"] >= 1


def _run(folder: Path) -> Path:
    rows = [{"checkpoint": "vanilla", "metric": "loss", "value": 4.0, "ci_low": 3.9, "ci_high": 4.1, "n": 10}]
    by_text = tidy([{**rows[0], "text": "kjv"}], task="text", split="test", seed=0)
    write_results(tidy(rows, task="text", split="test", seed=0), folder, {"config": {"out": str(folder)}}, by_text)
    (folder / "config.json").write_text(json.dumps({"out": str(folder)}))
    (folder / "figures").mkdir()
    (folder / "figures" / "a.html").write_text("<html></html>")
    (folder / "checkpoint-1").mkdir()
    return folder


def test_keep_copies_the_tables_only_and_they_read_back(tmp_path):
    run = _run(tmp_path / "runs" / "gap-x")
    kept = keep_run.keep(run, tmp_path / "results")
    assert kept == tmp_path / "results" / "gap-x"
    assert {path.name for path in kept.iterdir()} == set(keep_run.KEPT)
    assert read_results(kept)[0].equals(read_results(run)[0])


@pytest.mark.parametrize("table", ["results.parquet", "by_text.parquet"])
def test_a_damaged_run_is_refused_and_nothing_is_kept(tmp_path, table):
    run = _run(tmp_path / "runs" / "gap-x")
    pd.read_parquet(run / table).assign(value=5.0).to_parquet(run / table)  # changed after its digest was recorded
    with pytest.raises(ForethoughtError, match="changed or damaged"):
        keep_run.keep(run, tmp_path / "results")
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
