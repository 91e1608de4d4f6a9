"""Keep finished runs' tables in results/, the repository's record of the runs behind the README's numbers.

A run's folder in runs/ holds checkpoints, caches and figures that are not committed (and a machine's runs/ does
not outlive it); its tables are small. This copies a run's ``results.parquet`` / ``.csv``, ``by_text.*``,
``meta.json`` and ``config.json`` — after checking the tables against the digests its ``meta.json`` recorded —
into ``results/<run name>/``, so that ``forethought seeds`` and ``forethought trend`` can combine runs made in
other sessions or on other machines (``trend`` reads a run's model size from its ``meta.json``). Each kept
``meta.json`` names the commit, threads and package versions that made it.

    python scripts/keep_run.py runs/gap-cpu-gpt2-nano-s0 [RUN …]   # → results/gap-cpu-gpt2-nano-s0/

A maintainer's tool, not a user command; tests/test_results.py checks every kept run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from forethought.analyses.results import read_results
from forethought.core.errors import ForethoughtError
from forethought.core.files import check_digest, staged_folder

RESULTS = Path(__file__).resolve().parents[1] / "results"
KEPT = ("results.parquet", "results.csv", "by_text.parquet", "by_text.csv", "meta.json", "config.json")


def keep(run: str | Path, into: Path = RESULTS) -> Path:
    """Copy ``run``'s tables (:data:`KEPT`, those it has) into ``into / run's name``, replacing an earlier copy;
    a run whose tables changed since they were written is refused and nothing is copied."""
    run = Path(run)
    _, meta = read_results(run)  # a finished run; results.parquet checked against its digest
    for name, digest in meta.get("digests", {}).items():
        check_digest(run / name, digest, "rerun its command")
    if not (run / "config.json").is_file():
        raise ForethoughtError(f"{run} has no config.json: not a finished run")
    with staged_folder(into / run.name) as staging:
        for name in KEPT:
            if (run / name).is_file():
                (staging / name).write_bytes((run / name).read_bytes())
    return into / run.name


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python scripts/keep_run.py RUN [RUN …]")
    try:
        for folder in sys.argv[1:]:
            print(f"kept {folder} → {keep(folder)}")
    except ForethoughtError as error:
        raise SystemExit(f"keep_run: {error}") from None
