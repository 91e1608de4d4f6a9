"""Separating pre-caching from breadcrumbs (``forethought precache``) for a vanilla / myopic twin pair.

Per (layer, τ): the pre-caching estimate P = acc_vanilla − acc_myopic with a paired bootstrap interval (both
twins' probes are scored on the same held-out positions; the bootstrap resamples the same documents for
both); the **loss-matched** estimate P_matched = acc(vanilla at the myopic twin's loss) − acc_myopic, where the
vanilla side is the vanilla run's saved checkpoint whose held-out loss is nearest the myopic twin's
(:func:`models.twins.loss_matched`) — P rises whenever the vanilla twin is simply better at the present token,
P_matched does not; and the breadcrumb estimate B = acc_myopic — information a model trained only for the
present still carries about x[t+τ] — also net of the random-init control (and, as every probe, of the
skip-bigram). Beside them: the count baselines, each model's held-out loss, and each twin's future-gradient
split per layer (:mod:`probes.gradients`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from forethought.analyses.engine import heldout_tokens, load_checkpoints, probe_checkpoints, probe_meta
from forethought.analyses.experiment import check_out, finish_run, writes_run
from forethought.analyses.plots import FDR_NOTE, difference_heatmap
from forethought.analyses.probing import PROBE_COLUMNS, ProbeSettings, ProbingResults
from forethought.analyses.results import CONTROL, tidy
from forethought.core.errors import ForethoughtError
from forethought.models.families import n_layers
from forethought.models.heldout import HeldOutSample
from forethought.models.lm import LMCheckpoint
from forethought.models.train import resolve_device
from forethought.models.twins import LossMatch, check_twins, loss_matched
from forethought.probes.gradients import SHARE, future_gradient_split
from forethought.probes.metrics import POOLED, mean_scores

log = logging.getLogger(__name__)

PRECACHE = "pre-caching (vanilla − myopic)"
MATCHED = "vanilla at the myopic loss"  # the loss-matched vanilla checkpoint's name in the table
PRECACHE_MATCHED = f"pre-caching, loss-matched ({MATCHED} − myopic)"
B_NET_CONTROL = f"myopic − {CONTROL}"  # the breadcrumb estimate net of the random-init control


@dataclass
class PrecacheConfig(ProbeSettings):
    """Settings of ``forethought precache``: the probe settings plus the twins; every field is a flag."""

    vanilla: str | None = None  # the vanilla twin: checkpoint or run folder
    myopic: str | None = None  # the myopic twin: same architecture, tokenizer and training data
    share_sequences: int = 64  # held-out sequences for each twin's future-gradient share
    loss_matched: bool = True  # also P against the vanilla run's checkpoint of the myopic twin's held-out loss
    out: str = "runs/precache"  # run folder: table, meta.json, figures, probe scores
    figures_dir: str | None = None  # also copy the figures here

    def __post_init__(self):
        super().__post_init__()
        self.named_checkpoints()

    def named_checkpoints(self) -> dict[str, str]:
        if self.vanilla is None or self.myopic is None:
            raise ForethoughtError("give the twins: `vanilla` and `myopic`")
        return {"vanilla": self.vanilla, "myopic": self.myopic}


@dataclass
class PrecacheResults(ProbingResults):
    """Probe metrics of the twins, the control and the baselines; P per (layer, τ); gradient shares."""

    CONFIG: ClassVar[type] = PrecacheConfig
    DERIVED: ClassVar[tuple[str, ...]] = (PRECACHE, PRECACHE_MATCHED, B_NET_CONTROL)

    def precaching(self, metric: str = "top1", matched: bool = False) -> pd.DataFrame:
        """P (layers × τ) for ``metric``; ``matched``: P_matched, against the loss-matched vanilla checkpoint."""
        rows = self.table[(self.table["checkpoint"] == (PRECACHE_MATCHED if matched else PRECACHE))
                          & (self.table["metric"] == metric)]
        return rows.pivot(index="layer", columns="tau", values="value")

    def losses(self) -> pd.DataFrame:
        """Each model's held-out next-token loss (vanilla, myopic, the loss-matched vanilla checkpoint) with its
        95 % interval over documents."""
        rows = self.table[(self.table["metric"] == "loss") & self.table["layer"].isna()]
        return rows.set_index("checkpoint")[["value", "ci_low", "ci_high", "n"]]

    def breadcrumbs(self, metric: str = "top1") -> pd.DataFrame:
        """B = the myopic twin's probe metric (layers × τ)."""
        rows = self._probed(metric)
        return rows[rows["checkpoint"] == "myopic"].pivot(index="layer", columns="tau", values="value")

    def heatmap(self, metric: str = "top1", matched: bool = False) -> go.Figure:
        """Layer × τ heatmap of P (``matched``: P_matched); cells not significant over the grid (Benjamini–
        Hochberg, 5 % false-discovery rate) are marked "n.s."."""
        name = PRECACHE_MATCHED if matched else PRECACHE
        rows = self.table[(self.table["checkpoint"] == name) & (self.table["metric"] == metric)]
        vanilla = f"{metric}(vanilla at the myopic twin's loss)" if matched else f"{metric}(vanilla)"
        return difference_heatmap(rows, f"{'P_matched' if matched else 'Pre-caching estimate P'} = {vanilla} − "
                                        f"{metric}(myopic), paired 95% CI; " + FDR_NOTE, colorbar="P")

    def figures(self) -> dict[str, go.Figure]:
        figures = {f"precache_{self.config.kind}_top1": self.figure(),
                   f"precache_{self.config.kind}_heatmap": self.heatmap()}
        if (self.table["checkpoint"] == PRECACHE_MATCHED).any():
            figures[f"precache_{self.config.kind}_heatmap_matched"] = self.heatmap(matched=True)
        return figures

    def summary(self) -> str:
        lines = [super().summary(), "pre-caching estimate P (top-1, vanilla − myopic), layers × τ:",
                 self.precaching().to_string(float_format=lambda v: f"{v:+.3f}")]
        if (self.table["checkpoint"] == PRECACHE_MATCHED).any():
            losses = self.losses()["value"]
            lines += [f"held-out loss: vanilla {losses['vanilla']:.3f}, myopic {losses['myopic']:.3f}, the vanilla "
                      f"run's checkpoint nearest the myopic loss {losses[MATCHED]:.3f}; P_matched (top-1, that "
                      "checkpoint − myopic), layers × τ:",
                      self.precaching(matched=True).to_string(float_format=lambda v: f"{v:+.3f}")]
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
    check_out(config.out, config)  # the folder and the layers, before the loss match's work and warnings
    config.layer_list(n_layers(checkpoints["vanilla"].model.config))
    match, heldout = None, None
    if config.loss_matched:  # the checkpoint of matching loss is found on the sample the probes read
        heldout = heldout_tokens(checkpoints, config)
        match = loss_matched(checkpoints["vanilla"], checkpoints["myopic"], torch.from_numpy(heldout[1].tokens),
                             config.batch_sequences, config.progress)
        if match.source != checkpoints["vanilla"].source:
            checkpoints[MATCHED] = LMCheckpoint.load(match.source)
        if len(match.vanilla_losses) == 1:
            log.warning("the vanilla run saved one checkpoint: P_matched is P. Train it with `checkpoint_every` N "
                        "and `keep_checkpoints` K to have checkpoints of lower skill to match")
    run = probe_checkpoints(config, checkpoints, config.out, heldout)  # checks the settings, then writes the folder
    scores = {**run.scores, MATCHED: run.scores.get(MATCHED, run.scores["vanilla"])}
    differences = [("vanilla", "myopic", PRECACHE)] + [(MATCHED, "myopic", PRECACHE_MATCHED)] * config.loss_matched
    differences += [("myopic", CONTROL, B_NET_CONTROL)] * config.random_init
    rows: list[dict[str, Any]] = list(run.rows)
    text_rows: list[dict[str, Any]] = list(run.text_rows)
    for by_text, into in ((False, rows), (True, text_rows)):
        for a, b, name in differences:
            into += scores[a].minus(scores[b], by_text).assign(checkpoint=name, target=config.target()
                                                               ).to_dict("records")
    if match is not None:
        rows += _loss_rows(match, run.engine.sample, config.seed)
    device = resolve_device(config.device)
    for name in ("vanilla", "myopic"):
        model = checkpoints[name].model.to(device)
        shared = run.engine.sample.spread(config.share_sequences)
        split = future_gradient_split(model, torch.from_numpy(run.tokens[shared]), config.batch_sequences,
                                      config.seed, clusters=run.engine.sample.clusters[shared])
        rows += [{"checkpoint": name, "layer": layer, "metric": metric, "split": "test", **estimate.columns()}
                 for metric, by_layer in split.items() for layer, estimate in by_layer.items()]
    constants = dict(task=f"text: {run.data.corpus}", seed=config.seed)
    results = PrecacheResults(config=config, table=tidy(rows, PROBE_COLUMNS, **constants),
                              by_text=tidy(text_rows, PROBE_COLUMNS, **constants))
    finish_run(results, Path(config.out), {**probe_meta(run), "loss_match": match and match.record()})
    return results


def _loss_rows(match: LossMatch, sample: HeldOutSample, seed: int) -> list[dict[str, Any]]:
    """Held-out loss rows (95 % intervals over documents) of the vanilla twin, the myopic twin and the loss-matched
    vanilla checkpoint."""
    final = match.vanilla_losses[max(match.vanilla_losses)]
    rows = []
    for name, losses in (("vanilla", final), ("myopic", match.myopic_losses), (MATCHED, match.losses)):
        (estimate,) = mean_scores(losses.reshape(-1), np.repeat(sample.clusters, losses.shape[1]), seed=seed)
        rows.append({"checkpoint": name, "metric": "loss", "tau": 1, "target": "next token", "split": POOLED,
                     **estimate.columns()})
    return rows
