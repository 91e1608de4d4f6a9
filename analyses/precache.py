"""Separating pre-caching from breadcrumbs (``forethought precache``) for a vanilla / myopic twin pair.

Per (layer, τ): the pre-caching estimate P = acc_vanilla − acc_myopic with a paired bootstrap interval (both
twins' probes are scored on the same held-out positions; the bootstrap resamples the same sequences for
both), and the breadcrumb estimate B = acc_myopic — information a model trained only for the present still
carries about x[t+τ]. Beside them: the random-init control, the count baselines, and each twin's
future-gradient share per layer (:mod:`probes.gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import plotly.graph_objects as go
import torch

from forethought.analyses.engine import load_checkpoints, probe_checkpoints, probe_meta
from forethought.analyses.experiment import finish_run, writes_run
from forethought.analyses.plots import FDR_NOTE, difference_heatmap
from forethought.analyses.probing import ProbeSettings, ProbingResults
from forethought.analyses.results import tidy
from forethought.core.errors import ForethoughtError
from forethought.models.train import resolve_device
from forethought.models.twins import check_twins
from forethought.probes.gradients import SHARE, future_gradient_split

PRECACHE = "pre-caching (vanilla − myopic)"


@dataclass
class PrecacheConfig(ProbeSettings):
    """Settings of ``forethought precache``: the probe settings plus the twins; every field is a flag."""

    vanilla: str | None = None  # the vanilla twin: checkpoint or run folder
    myopic: str | None = None  # the myopic twin: same architecture, tokenizer and training data
    share_sequences: int = 64  # held-out sequences for each twin's future-gradient share
    out: str = "runs/precache"
    figures_dir: str | None = None  # also copy the figures here

    def __post_init__(self):
        super().__post_init__()
        self.named_checkpoints()

    def named_checkpoints(self) -> dict[str, str]:
        if self.vanilla is None or self.myopic is None:
            raise ForethoughtError("give the twins: --vanilla and --myopic")
        return {"vanilla": self.vanilla, "myopic": self.myopic}


@dataclass
class PrecacheResults(ProbingResults):
    """Probe metrics of the twins, the control and the baselines; P per (layer, τ); gradient shares."""

    CONFIG: ClassVar[type] = PrecacheConfig
    DERIVED: ClassVar[tuple[str, ...]] = (PRECACHE,)

    def precaching(self, metric: str = "top1") -> pd.DataFrame:
        """P (layers × τ) for ``metric``."""
        rows = self.table[(self.table["checkpoint"] == PRECACHE) & (self.table["metric"] == metric)]
        return rows.pivot(index="layer", columns="tau", values="value")

    def breadcrumbs(self, metric: str = "top1") -> pd.DataFrame:
        """B = the myopic twin's probe metric (layers × τ)."""
        rows = self._probed(metric)
        return rows[rows["checkpoint"] == "myopic"].pivot(index="layer", columns="tau", values="value")

    def heatmap(self, metric: str = "top1") -> go.Figure:
        """Layer × τ heatmap of P; cells not significant over the grid (Benjamini–Hochberg, 5 % false-discovery
        rate) are marked "n.s."."""
        rows = self.table[(self.table["checkpoint"] == PRECACHE) & (self.table["metric"] == metric)]
        return difference_heatmap(rows, f"Pre-caching estimate P = {metric}(vanilla) − {metric}(myopic), "
                                        "paired 95% CI; " + FDR_NOTE, colorbar="P")

    def figures(self) -> dict[str, go.Figure]:
        return {
            f"precache_{self.config.kind}_top1": self.figure(),
            f"precache_{self.config.kind}_heatmap": self.heatmap(),
        }

    def summary(self) -> str:
        lines = [super().summary(), "pre-caching estimate P (top-1, vanilla − myopic), layers × τ:",
                 self.precaching().to_string(float_format=lambda v: f"{v:+.3f}")]
        shares = self.table[self.table["metric"] == SHARE]
        lines.append("future share of the squared gradient by layer: " + "; ".join(
            f"{name} " + ", ".join(f"{v:.3f}" for v in group.sort_values("layer")["value"])
            for name, group in shares.groupby("checkpoint", sort=False)))
        return "\n".join(lines)


@writes_run
def run_precache(config: PrecacheConfig) -> PrecacheResults:
    """Probe both twins and the control, estimate P and B per (layer, τ); write table, meta and figures."""
    checkpoints = load_checkpoints(config.named_checkpoints())
    check_twins(checkpoints["vanilla"], checkpoints["myopic"])
    run = probe_checkpoints(config, checkpoints, config.out)  # checks the settings, then writes the folder
    rows: list[dict[str, Any]] = list(run.rows)
    text_rows: list[dict[str, Any]] = list(run.text_rows)
    for by_text, into in ((False, rows), (True, text_rows)):
        into += run.scores["vanilla"].minus(run.scores["myopic"], by_text).assign(
            checkpoint=PRECACHE, target=config.target()).to_dict("records")
    device = resolve_device(config.device)
    for name in ("vanilla", "myopic"):
        model = checkpoints[name].model.to(device)
        shared = run.engine.sample.spread(config.share_sequences)
        split = future_gradient_split(model, torch.from_numpy(run.tokens[shared]), config.batch_sequences,
                                      config.seed, clusters=run.engine.sample.clusters[shared])
        rows += [{"checkpoint": name, "layer": layer, "metric": metric, "split": "test", **estimate.columns()}
                 for metric, estimates in split.items() for layer, estimate in enumerate(estimates)]
    constants = dict(task=f"text: {run.data.corpus}", seed=config.seed)
    results = PrecacheResults(config=config, table=tidy(rows, **constants), by_text=tidy(text_rows, **constants))
    finish_run(results, Path(config.out), probe_meta(run))
    return results
