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
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from forethought.core.errors import ForethoughtError, one_line
from forethought.core.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_digest,
    file_digest,
    read_json,
)
from forethought.core.threads import thread_settings
from forethought.core.versions import package_versions

COLUMNS = [
    "checkpoint", "task", "layer", "position", "tau", "target", "probe", "metric", "split", "seed",
    "value", "ci_low", "ci_high", "n",
]
CONTROL = "random init"  # the checkpoint name of the random-init control, in every experiment
BY_TEXT = "by_text"  # the file stem of a run's rows per text of a mixed held-out sample
def tidy(rows: pd.DataFrame | list[dict[str, Any]], extra: Sequence[str] = (), **constants: Any) -> pd.DataFrame:
    """Rows (+ columns shared by all of them) → a table with exactly :data:`COLUMNS`, typed (no rows: empty);
    an experiment's own ``extra`` columns (integers or text) stand before ``split``."""
    columns = COLUMNS[: COLUMNS.index("split")] + list(extra) + COLUMNS[COLUMNS.index("split"):]
    if len(rows) == 0:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows).assign(**constants)
    missing = set(COLUMNS) - set(table.columns) - {"layer", "position", "tau", "target", "probe"}
    if missing:
        raise ForethoughtError(f"results rows lack columns {sorted(missing)}")
    table = table.reindex(columns=columns)
    integers = ["layer", "position", "tau", "seed", "n"] + [c for c in extra if pd.api.types.is_numeric_dtype(table[c])]
    return table.astype(dict.fromkeys(integers, "Int64"))


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
        **thread_settings(),  # a run's numbers may depend on them: --threads N repeats it
        **details,
    }


def write_results(table: pd.DataFrame, out_dir: str | Path, meta: dict[str, Any],
                  by_text: pd.DataFrame | None = None) -> list[Path]:
    """Write ``results.parquet``, ``results.csv`` (and, where ``by_text`` has rows, ``by_text.parquet`` /
    ``.csv``: the same columns per text of a mixed held-out sample), then ``meta.json`` into ``out_dir``, with the
    parquet files' content digests (``meta["digests"]``: every read checks them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, digests = [], {}
    for stem, frame in (("results", table), (BY_TEXT, by_text)):
        if frame is not None and not frame.empty:
            paths += [out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"]
            atomic_write_bytes(paths[-2], frame.to_parquet(index=False))
            atomic_write_text(paths[-1], frame.to_csv(index=False))
            digests[paths[-2].name] = file_digest(paths[-2])
        elif stem == BY_TEXT:  # a rerun into the folder leaves no other run's rows behind
            for suffix in (".parquet", ".csv"):
                (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)
    paths.append(out_dir / "meta.json")
    atomic_write_json(paths[-1], {**meta, "digests": digests})
    return paths


def read_by_text(out_dir: str | Path) -> pd.DataFrame:
    """The per-text rows :func:`write_results` wrote (empty where the held-out text was one text)."""
    path = Path(out_dir) / f"{BY_TEXT}.parquet"
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    return _read_table(path, read_json(Path(out_dir) / "meta.json", RERUN).get("digests", {}))


def read_results(out_dir: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The table and meta written by :func:`write_results`: refused if the table changed since (its digest, where
    the run recorded one) or holds a rate outside [−1, 1] (top-1, top-5 and their differences)."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").is_file():
        raise ForethoughtError(f"cannot read results in {out_dir}: it holds no finished run (no meta.json)")
    meta = read_json(out_dir / "meta.json", RERUN)
    return _read_table(out_dir / "results.parquet", meta.get("digests", {})), meta


RERUN = "run its command again"
RATES = ("top1", "top5")  # metrics that are fractions of examples (their differences too): within [−1, 1]


def _read_table(path: Path, digests: dict[str, str]) -> pd.DataFrame:
    """A results parquet, its digest checked (runs from before digests were recorded have none) and its rates in
    range: a damaged table is named, never used."""
    if path.name in digests:
        check_digest(path, digests[path.name], RERUN)
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise ForethoughtError(f"cannot read {path} ({one_line(error, 160)}); {RERUN}") from None
    if {"metric", "value"} <= set(table.columns):
        rates = table.loc[table["metric"].isin(RATES), ["value", "ci_low", "ci_high"]].abs()
        if (rates > 1 + 1e-9).any().any():
            raise ForethoughtError(f"{path} holds a top-1 / top-5 value outside [−1, 1]: damaged; {RERUN}")
    return table
