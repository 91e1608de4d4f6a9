"""What every experiment shares: a config dataclass built from presets, its run folder, its training
settings, and a results object that reloads from the folder.

An experiment = a config dataclass (subclass of :class:`ExperimentConfig`; its fields double as CLI flags),
a ``run_*`` function, and a results dataclass (subclass of :class:`ExperimentResults`).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go

from forethought.analyses.plots import save_figure
from forethought.analyses.results import read_by_text, read_results, write_results
from forethought.core.errors import ForethoughtError
from forethought.core.files import atomic_write_json, check_out_folder, read_json, run_lock
from forethought.core.settings import (
    ANALYSIS_SETTINGS,
    Presets,
    build_config,
    check_preset,
    check_recorded_settings,
    check_settings,
    flat_defaults,
    flat_settings,
    record_settings,
    typed_settings,
)
from forethought.models.train import TrainConfig, TrainSettings


@dataclass
class ExperimentConfig(Presets):
    """What every experiment's config declares: where it starts (a preset), its seed, the training settings of its
    twins (:class:`~models.train.TrainSettings`, named flat on the command line), and where it writes. Subclasses
    are dataclasses that add the experiment's own settings, redeclare ``training`` and ``out`` with their own
    defaults, and fill ``PRESETS`` (flat settings)."""

    preset: str = "cpu"  # starting values: paper or cpu (recorded in the run); flags given override them
    seed: int = 0  # seeds the data, both twins' initialisation and the probes
    training: TrainSettings = field(default_factory=TrainSettings)
    out: str = "runs/experiment"  # run folder: results, checkpoints, figures (resumed when rerun)
    figures_dir: str | None = None  # also copy the figures here (e.g. the repository's figures/)
    device: str = "auto"  # "auto": CUDA when available, else the CPU; or "cpu", "cuda:1"
    progress: bool = True  # show progress bars

    def __post_init__(self):
        check_settings(self)
        check_preset(type(self), self.preset)

    def train_config(self, myopic: bool, steps: int) -> TrainConfig:
        """The training of one twin."""
        return self.training.for_run(steps, self.seed, myopic, self.device, self.progress)


@dataclass
class ExperimentResults:
    """A finished run: its config, the tidy table (over the whole held-out sample: split "test"), the training
    histories ({run name: records}) and, for a mixed held-out text, the same tidy rows per text (split
    "test: <text>"; written beside as ``by_text.parquet`` / ``.csv``; empty otherwise)."""

    CONFIG: ClassVar[type] = ExperimentConfig

    config: Any
    table: pd.DataFrame
    histories: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    by_text: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def from_folder(cls, out: str | Path):
        """Reload a finished run from its ``--out`` folder."""
        table, meta = read_results(out)
        histories = read_json(Path(out) / "histories.json", "run the command again to rewrite it")
        unknown = sorted(set(meta.get("config", {})) - set(flat_defaults(cls.CONFIG)))
        if unknown:
            raise ForethoughtError(
                f"{out} was written with settings this {cls.__name__} does not know ({', '.join(unknown)}): "
                "a run of another command or of an older workbench; run its command again"
            )
        config = build_config(cls.CONFIG, typed_settings(cls.CONFIG, meta["config"]))
        return cls(config=config, table=table, histories=histories, by_text=read_by_text(out))

    def figures(self) -> dict[str, go.Figure]:
        """{file stem: figure} written by :func:`finish_run`."""
        return {}


def writes_run(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate an experiment's ``run_*(config)``: it holds ``config.out``'s writer lock while it runs, so a
    second process writing the same folder is refused (with who holds it) instead of mixing files."""
    @functools.wraps(run)
    def locked(config: Any) -> Any:
        with run_lock(check_out_folder(config.out)):
            return run(config)
    return locked


def prepare_out(out: str | Path, config: Any) -> Path:
    """Create the run folder ``out``, or check that it holds a run with the same settings as ``config`` (a config
    dataclass); record them (atomically, :func:`core.settings.record_settings`). Where the folder is and how the run
    reports (:data:`~core.settings.UNBOUND`, and how often training evaluates or checkpoints) never bind it: a
    run folder may be moved, or named with a trailing slash.

    Refuses (changing nothing) when ``out`` is a file or its ``config.json`` differs from the settings.
    """
    out = check_out_folder(out)
    record_settings(out / ANALYSIS_SETTINGS, config)
    return out


def check_out(out: str | Path, config: Any) -> None:
    """Refuse, writing nothing, where :func:`prepare_out` would: a command calls it before work or warnings."""
    check_recorded_settings(check_out_folder(out) / ANALYSIS_SETTINGS, config)


def finish_run(results: ExperimentResults, out: Path, meta: dict[str, Any]) -> None:
    """Write the table, ``meta.json`` (with the config), the histories and the figures of a run; copy the
    figures to ``config.figures_dir`` too when it is set."""
    write_results(results.table, out, {**meta, "config": flat_settings(results.config)}, results.by_text)
    atomic_write_json(out / "histories.json", results.histories, indent=None)
    written = []
    for stem, figure in results.figures().items():
        written += save_figure(figure, out / "figures" / stem)
    if results.config.figures_dir is not None:
        Path(results.config.figures_dir).mkdir(parents=True, exist_ok=True)
        for path in dict.fromkeys(written):  # plotly.min.js once
            shutil.copy2(path, Path(results.config.figures_dir) / path.name)
