"""The tidy results table and its ``meta.json``.

One row per (checkpoint, task, layer, position, tau, target, probe, metric, split, seed) with ``value``,
``ci_low``, ``ci_high``, ``n``. ``tau`` is the offset of the predicted quantity from the probed position
(τ = 1: the next token; τ = −j: a feature of the input j positions back); ``position`` is the probed
position where a task has distinguished ones (empty: positions pooled). Cells that do not apply (the
layer of a loss) stay empty.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from forethought.core.errors import ForethoughtError, one_line
from forethought.core.files import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from forethought.core.versions import package_versions

COLUMNS = [
    "checkpoint", "task", "layer", "position", "tau", "target", "probe", "metric", "split", "seed",
    "value", "ci_low", "ci_high", "n",
]
CONTROL = "random init"  # the checkpoint name of the random-init control, in every experiment
def tidy(rows: pd.DataFrame | list[dict[str, Any]], **constants: Any) -> pd.DataFrame:
    """Rows (+ columns shared by all of them) → a table with exactly :data:`COLUMNS`, typed."""
    table = pd.DataFrame(rows).assign(**constants)
    missing = set(COLUMNS) - set(table.columns) - {"layer", "position", "tau", "target", "probe"}
    if missing:
        raise ForethoughtError(f"results rows lack columns {sorted(missing)}")
    table = table.reindex(columns=COLUMNS)
    return table.astype({"layer": "Int64", "position": "Int64", "tau": "Int64", "seed": "Int64", "n": "Int64"})


def git_revision() -> str | None:
    """The workbench's git commit, if it runs from a checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_meta(**details: Any) -> dict[str, Any]:
    """Provenance for a results folder: versions, git revision, time, CPU threads, plus the caller's details."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "threads": torch.get_num_threads(),  # a run's numbers may depend on it: --threads N repeats it
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        **details,
    }


def write_results(table: pd.DataFrame, out_dir: str | Path, meta: dict[str, Any]) -> list[Path]:
    """Write ``results.parquet``, ``results.csv`` and ``meta.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.parquet", out_dir / "results.csv", out_dir / "meta.json"]
    atomic_write_bytes(paths[0], table.to_parquet(index=False))
    atomic_write_text(paths[1], table.to_csv(index=False))
    atomic_write_json(paths[2], meta)
    return paths


def read_results(out_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The table and meta written by :func:`write_results`."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").is_file():
        raise ForethoughtError(f"cannot read results in {out_dir}: it holds no finished run (no meta.json)")
    meta = read_json(out_dir / "meta.json", "run its command again")
    try:
        return pd.read_parquet(out_dir / "results.parquet"), meta
    except (OSError, ValueError) as error:
        reason = one_line(error, 160)
        raise ForethoughtError(f"cannot read results in {out_dir} ({reason}); run its command again") from None
