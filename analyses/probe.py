"""Future-token probes for checkpoints (``forethought probe``): cache, fit every (layer, τ), score, plot.

For each named checkpoint: its residual streams over held-out text are cached (:mod:`probes.cache`), and one
probe per (layer, τ) predicting x[t+τ] from h[l, t] is fitted and scored on held-out sequences
(:mod:`probes.future`). Beside them: the same probes on a randomly initialised model of the first
checkpoint's architecture (the control), and the unigram / skip-bigram count baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from forethought.analyses.engine import load_checkpoints, probe_checkpoints, probe_meta
from forethought.analyses.experiment import finish_run, writes_run
from forethought.analyses.probing import PROBE_COLUMNS, ProbeSettings, ProbingResults, check_names
from forethought.analyses.results import tidy
from forethought.core.errors import ForethoughtError


@dataclass
class ProbeConfig(ProbeSettings):
    """Settings of ``forethought probe``; every field is also a command-line flag."""

    checkpoints: dict[str, str] = field(default_factory=dict)  # models: run folder, hub id, smollm2-135m or gguf:PATH
    out: str = "runs/probe"  # run folder: table, meta.json, figures, probe scores
    figures_dir: str | None = None  # also copy the figures here
    show: int = 0  # also print N held-out positions as text: per τ, the best layer's top-5 tokens beside the truth

    def __post_init__(self):
        super().__post_init__()
        if not self.named_checkpoints():
            raise ForethoughtError("give `checkpoints` (name → folder)")

    def named_checkpoints(self) -> dict[str, str]:
        check_names(self.checkpoints)
        return dict(self.checkpoints)


@dataclass
class ProbeResults(ProbingResults):
    """Held-out metrics of every (checkpoint, layer, τ) probe, the control and the count baselines; with
    ``--show N``, the first checkpoint's probes at N held-out positions as text (:attr:`predictions`, per τ)."""

    CONFIG: ClassVar[type] = ProbeConfig
    predictions: dict[int, pd.DataFrame] = field(default_factory=dict)

    def summary(self) -> str:
        shown = [f"{self.config.kind} probes of {table.attrs['checkpoint']} at layer {table.attrs['layer']}, τ = {tau} "
                 f"(its best top-1), {len(table)} held-out positions:\n" + table.to_string(index=False)
                 for tau, table in self.predictions.items()]
        return "\n".join([super().summary(), *shown])


@writes_run
def run_probe(config: ProbeConfig) -> ProbeResults:
    """Cache and probe every checkpoint (and the control) on held-out text; write table, meta and figures."""
    checkpoints = load_checkpoints(config.named_checkpoints())
    run = probe_checkpoints(config, checkpoints, config.out)
    constants = dict(task=f"text: {run.data.corpus}", seed=config.seed)
    results = ProbeResults(config=config, table=tidy(run.rows, PROBE_COLUMNS, **constants),
                           by_text=tidy(run.text_rows, PROBE_COLUMNS, **constants))
    finish_run(results, Path(config.out), probe_meta(run))
    if config.show:
        name = next(iter(checkpoints))
        for tau, layer in results.best_layers(name).items():
            shown = run.engine.predictions(name, layer, tau, config.show)
            shown.attrs.update(checkpoint=name, layer=layer)
            results.predictions[tau] = shown
    return results
