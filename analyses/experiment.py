"""What every experiment shares: a config dataclass built from presets, its run folder, its training
settings, and a results object that reloads from the folder.

An experiment = a config dataclass (subclass of :class:`ExperimentConfig`; its fields double as CLI flags),
a ``run_*`` function, and a results dataclass (subclass of :class:`ExperimentResults`).
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go

from forethought.analyses.plots import save_figure
from forethought.analyses.results import read_results, write_results
from forethought.core.errors import ForethoughtError
from forethought.core.files import atomic_write_json, check_out_folder, read_json, run_lock
from forethought.core.settings import UNBOUND, typed_settings
from forethought.models.checkpoint import changed_settings
from forethought.models.train import TrainConfig


class ExperimentConfig:
    """Mixin for experiment configs. Subclasses are dataclasses with the fields ``preset``, ``batch_size``,
    ``lr``, ``weight_decay``, ``warmup_frac``, ``grad_clip``, ``seed``, ``myopic_cut``, ``eval_every``,
    ``checkpoint_every``, ``out``, ``figures_dir``, ``device``, ``progress``, and a ``PRESETS`` table of overrides."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # fields that do not change results: a rerun into the same --out may differ in them
    PRESENTATION: ClassVar[tuple[str, ...]] = ("figures_dir", "device", "progress", "checkpoint_every", "eval_every")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """The preset's values, then ``overrides`` (validated by the dataclass)."""
        if name not in cls.PRESETS:
            raise ForethoughtError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ForethoughtError(f"unknown settings {sorted(unknown)}")
        return cls(**{**cls.PRESETS[name], **overrides, "preset": name})

    def results_settings(self) -> dict[str, Any]:
        """The settings a run folder is bound to (:func:`prepare_out` also drops :data:`UNBOUND`; configs
        without training pass ``asdict(config)`` to it)."""
        return {k: v for k, v in asdict(self).items() if k not in self.PRESENTATION}

    def train_config(self, myopic: bool, steps: int) -> TrainConfig:
        return TrainConfig(
            steps=steps, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            warmup_frac=self.warmup_frac, grad_clip=self.grad_clip, seed=self.seed, myopic=myopic,
            myopic_cut=self.myopic_cut, eval_every=self.eval_every, checkpoint_every=self.checkpoint_every,
            device=self.device, progress=self.progress,
        )


@dataclass
class ExperimentResults:
    """A finished run: its config, the tidy table and the training histories ({run name: records})."""

    CONFIG: ClassVar[type] = ExperimentConfig

    config: Any
    table: pd.DataFrame
    histories: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, out: str | Path):
        """Reload a finished run from its ``--out`` folder."""
        table, meta = read_results(out)
        histories = read_json(Path(out) / "histories.json", "run the command again to rewrite it")
        unknown = sorted(set(meta.get("config", {})) - {f.name for f in fields(cls.CONFIG)})
        if unknown:
            raise ForethoughtError(
                f"{out} was written with settings this {cls.__name__} does not know ({', '.join(unknown)}): "
                "a run of another command or of an older workbench; run its command again"
            )
        return cls(config=cls.CONFIG(**typed_settings(cls.CONFIG, meta["config"])), table=table, histories=histories)

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
    """Create the run folder ``out``, or check that it holds a run with the same settings as ``config`` (a
    config dataclass; :meth:`ExperimentConfig.results_settings` where it has them); record them (atomically).
    Where the folder is and how the run reports (:data:`UNBOUND`) never bind it: a run folder may be moved, or
    named with a trailing slash.

    Refuses (changing nothing) when ``out`` is a file or its ``config.json`` differs from the settings.
    """
    out = check_out_folder(out)
    settings = config.results_settings() if isinstance(config, ExperimentConfig) else asdict(config)
    settings = _as_saved({k: v for k, v in settings.items() if k not in UNBOUND})
    settings_file = out / "config.json"
    if settings_file.exists():
        saved = read_json(settings_file, f"remove {out} to start afresh")
        saved = _as_saved(typed_settings(type(config), {k: v for k, v in saved.items() if k not in UNBOUND}))
        if changed := changed_settings(saved, settings, _defaults(type(config))):
            raise ForethoughtError(f"--out {out} holds a run with other settings ({changed}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(settings_file, settings)
    return out


def _defaults(cls: type) -> dict[str, Any]:
    """Each field's default, as ``config.json`` holds it: what a run made before the field existed had."""
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(cls)
                if f.default is not MISSING or f.default_factory is not MISSING}
    return _as_saved(defaults)


def _as_saved(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as ``config.json`` holds them (tuples become lists), so saved and wanted compare equal."""
    return json.loads(json.dumps(settings))


def finish_run(results: ExperimentResults, out: Path, meta: dict[str, Any]) -> None:
    """Write the table, ``meta.json`` (with the config), the histories and the figures of a run; copy the
    figures to ``config.figures_dir`` too when it is set."""
    write_results(results.table, out, {**meta, "config": asdict(results.config)})
    atomic_write_json(out / "histories.json", results.histories, indent=None)
    written = []
    for stem, figure in results.figures().items():
        written += save_figure(figure, out / "figures" / stem)
    if results.config.figures_dir is not None:
        Path(results.config.figures_dir).mkdir(parents=True, exist_ok=True)
        for path in written:
            shutil.copy2(path, Path(results.config.figures_dir) / path.name)
