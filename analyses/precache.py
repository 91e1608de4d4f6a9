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

With ``mtp``, the bracket (issue 28): a third twin trained to predict x[t+1] … x[t+K] (``train --objective
mtp:K``), the positive control, adds P_mtp = acc(mtp) − acc(vanilla) and its loss-matched form, where the
better next-token model's run is searched for the checkpoint nearest the other's loss — does the instrument see
more pre-caching in a model trained for it?
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
MTP = "mtp"  # the multi-token twin, the positive control (issue 28)
BEYOND = "beyond vanilla (mtp − vanilla)"  # P_mtp: what training for later tokens adds to the probes
BEYOND_MATCHED = "beyond vanilla, loss-matched (mtp − vanilla at equal loss)"  # the better one's run matched


@dataclass
class PrecacheConfig(ProbeSettings):
    """Settings of ``forethought precache``: the probe settings plus the twins; every field is a flag."""

    vanilla: str | None = None  # the vanilla twin: checkpoint or run folder
    myopic: str | None = None  # the myopic twin: same architecture, tokenizer and training data
    mtp: str | None = None  # positive control: a twin trained as the vanilla one but with objective mtp:K (P_mtp)
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
        return {"vanilla": self.vanilla, "myopic": self.myopic, **({MTP: self.mtp} if self.mtp else {})}


@dataclass
class PrecacheResults(ProbingResults):
    """Probe metrics of the twins, the control and the baselines; P per (layer, τ); gradient shares."""

    CONFIG: ClassVar[type] = PrecacheConfig
    DERIVED: ClassVar[tuple[str, ...]] = (PRECACHE, PRECACHE_MATCHED, B_NET_CONTROL, BEYOND, BEYOND_MATCHED)

    def precaching(self, metric: str = "top1", matched: bool = False, beyond: bool = False) -> pd.DataFrame:
        """P (layers × τ) for ``metric``; ``matched``: P_matched, against the loss-matched vanilla checkpoint;
        ``beyond``: P_mtp = mtp − vanilla instead (``matched``: the better twin's run at the other's loss)."""
        rows = self.table[(self.table["checkpoint"] == _estimate(matched, beyond)) & (self.table["metric"] == metric)]
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

    def heatmap(self, metric: str = "top1", matched: bool = False, beyond: bool = False) -> go.Figure:
        """Layer × τ heatmap of P (``matched``: P_matched; ``beyond``: P_mtp); cells not significant over the grid
        (Benjamini–Hochberg, 5 % false-discovery rate) are marked "n.s."."""
        rows = self.table[(self.table["checkpoint"] == _estimate(matched, beyond)) & (self.table["metric"] == metric)]
        if beyond:
            title = f"P_mtp = {metric}(mtp) − {metric}(vanilla)"
            if matched:
                name = self.mtp_matched()
                mtp, vanilla = (name, "vanilla") if name == MTP_AT_VANILLA else (MTP, name)
                title = f"P_mtp at equal loss = {metric}({mtp}) − {metric}({vanilla})"
            return difference_heatmap(rows, f"{title}, paired 95% CI; " + FDR_NOTE, colorbar="P_mtp")
        vanilla = f"{metric}(vanilla at the myopic twin's loss)" if matched else f"{metric}(vanilla)"
        return difference_heatmap(rows, f"{'P_matched' if matched else 'Pre-caching estimate P'} = {vanilla} − "
                                        f"{metric}(myopic), paired 95% CI; " + FDR_NOTE, colorbar="P")

    def mtp_matched(self) -> str:
        """The table's name of the loss-matched checkpoint of the multi-token bracket: ``mtp at the vanilla loss``
        when the multi-token twin is the better next-token model, else ``vanilla at the mtp loss``."""
        (name,) = [n for n in self.table["checkpoint"].unique() if n in (MTP_AT_VANILLA, VANILLA_AT_MTP)]
        return name

    def figures(self) -> dict[str, go.Figure]:
        figures = {f"precache_{self.config.kind}_top1": self.figure(),
                   f"precache_{self.config.kind}_heatmap": self.heatmap()}
        for matched, beyond, suffix in ((True, False, "_matched"), (False, True, "_mtp"), (True, True, "_mtp_matched")):
            if (self.table["checkpoint"] == _estimate(matched, beyond)).any():
                figures[f"precache_{self.config.kind}_heatmap{suffix}"] = self.heatmap(matched=matched, beyond=beyond)
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
        if (self.table["checkpoint"] == BEYOND).any():
            losses = self.losses()["value"]
            matched_name = self.mtp_matched() if (self.table["checkpoint"] == BEYOND_MATCHED).any() else None
            lines += [f"the multi-token twin (positive control): held-out next-token loss {losses[MTP]:.3f} "
                      f"(vanilla {losses['vanilla']:.3f}); P_mtp (top-1, mtp − vanilla), layers × τ:",
                      self.precaching(beyond=True).to_string(float_format=lambda v: f"{v:+.3f}")]
            if matched_name is not None:
                lines += [f"loss-matched ({matched_name}, loss {losses[matched_name]:.3f}), layers × τ:",
                          self.precaching(matched=True, beyond=True).to_string(float_format=lambda v: f"{v:+.3f}")]
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
    if MTP in checkpoints:
        check_twins(checkpoints["vanilla"], checkpoints[MTP], role=MTP)
    check_out(config.out, config)  # the folder and the layers, before the loss match's work and warnings
    config.layer_list(n_layers(checkpoints["vanilla"].model.config))
    matches: dict[str, LossMatch] = {}  # {the matched checkpoint's name: its match}
    heldout = None
    if config.loss_matched:  # the checkpoint of matching loss is found on the sample the probes read
        heldout = heldout_tokens(checkpoints, config)
        tokens = torch.from_numpy(heldout[1].tokens)
        matches[MATCHED] = loss_matched(checkpoints["vanilla"], checkpoints["myopic"], tokens,
                                        config.batch_sequences, config.progress)
        if len(matches[MATCHED].vanilla_losses) == 1:
            log.warning("the vanilla run saved one checkpoint: P_matched is P. Train it with `checkpoint_every` N "
                        "and `keep_checkpoints` K to have checkpoints of lower skill to match")
        if MTP in checkpoints:
            matches.update(_bracket_match(checkpoints, tokens, config, matches[MATCHED]))
        for name, match in matches.items():
            if match.source != checkpoints[MATCH_ROLES[name][0]].source:
                checkpoints[name] = LMCheckpoint.load(match.source)
    run = probe_checkpoints(config, checkpoints, config.out, heldout)  # checks the settings, then writes the folder
    scores = {**run.scores, **{name: run.scores.get(name, run.scores[MATCH_ROLES[name][0]]) for name in matches}}
    differences = [("vanilla", "myopic", PRECACHE)] + [(MATCHED, "myopic", PRECACHE_MATCHED)] * config.loss_matched
    differences += [("myopic", CONTROL, B_NET_CONTROL)] * config.random_init
    if MTP in checkpoints:
        differences.append((MTP, "vanilla", BEYOND))
        differences += [(MTP_AT_VANILLA, "vanilla", BEYOND_MATCHED)] * (MTP_AT_VANILLA in matches)
        differences += [(MTP, VANILLA_AT_MTP, BEYOND_MATCHED)] * (VANILLA_AT_MTP in matches)
    rows: list[dict[str, Any]] = list(run.rows)
    text_rows: list[dict[str, Any]] = list(run.text_rows)
    for by_text, into in ((False, rows), (True, text_rows)):
        for a, b, name in differences:
            into += scores[a].minus(scores[b], by_text).assign(checkpoint=name, target=config.target()
                                                               ).to_dict("records")
    rows += _loss_rows(matches, run.engine.sample, config.seed)
    device = resolve_device(config.device)
    for name in ("vanilla", "myopic", *[MTP] * (MTP in checkpoints)):
        model = checkpoints[name].model.to(device)
        shared = run.engine.sample.spread(config.share_sequences)
        split = future_gradient_split(model, torch.from_numpy(run.tokens[shared]), config.batch_sequences,
                                      config.seed, clusters=run.engine.sample.clusters[shared])
        rows += [{"checkpoint": name, "layer": layer, "metric": metric, "split": "test", **estimate.columns()}
                 for metric, by_layer in split.items() for layer, estimate in by_layer.items()]
    constants = dict(task=f"text: {run.data.corpus}", seed=config.seed)
    results = PrecacheResults(config=config, table=tidy(rows, PROBE_COLUMNS, **constants),
                              by_text=tidy(text_rows, PROBE_COLUMNS, **constants))
    finish_run(results, Path(config.out), {**probe_meta(run), "loss_match": matches[MATCHED].record()
                                           if matches else None,
                                           **({"loss_match_mtp": {name: match.record(*MATCH_ROLES[name])
                                                                  for name, match in matches.items()
                                                                  if name != MATCHED}} if MTP in checkpoints else {})})
    return results


MTP_AT_VANILLA, VANILLA_AT_MTP = "mtp at the vanilla loss", "vanilla at the mtp loss"
MATCH_ROLES = {MATCHED: ("vanilla", "myopic"), MTP_AT_VANILLA: (MTP, "vanilla"), VANILLA_AT_MTP: ("vanilla", MTP)}


def _estimate(matched: bool, beyond: bool) -> str:
    """The table's name of P, P_matched, P_mtp or P_mtp loss-matched."""
    return {(False, False): PRECACHE, (True, False): PRECACHE_MATCHED, (False, True): BEYOND,
            (True, True): BEYOND_MATCHED}[matched, beyond]


def _bracket_match(checkpoints: dict[str, LMCheckpoint], tokens: torch.Tensor, config: PrecacheConfig,
                   vanilla: LossMatch) -> dict[str, LossMatch]:
    """The multi-token bracket at equal skill: the better next-token model's run searched for the checkpoint
    nearest the other twin's held-out loss — {``mtp at the vanilla loss`` or ``vanilla at the mtp loss``: match}.
    ``vanilla``: the myopic twin's match, whose vanilla losses are not measured again."""
    match = loss_matched(checkpoints[MTP], checkpoints["vanilla"], tokens, config.batch_sequences, config.progress,
                         measured=vanilla.measured)
    if match.given_losses.mean() <= match.myopic_losses.mean():
        return {MTP_AT_VANILLA: match}
    return {VANILLA_AT_MTP: loss_matched(checkpoints["vanilla"], checkpoints[MTP], tokens, config.batch_sequences,
                                         config.progress, measured={**vanilla.measured, **match.measured})}


def _loss_rows(matches: dict[str, LossMatch], sample: HeldOutSample, seed: int) -> list[dict[str, Any]]:
    """Held-out next-token loss rows (95 % intervals over documents) of every twin and every loss-matched
    checkpoint of ``matches``."""
    losses = {}
    for name, match in matches.items():
        searched, target = MATCH_ROLES[name]
        losses.update({searched: match.given_losses, target: match.myopic_losses,
                       name: match.losses})
    rows = []
    for name, values in losses.items():
        (estimate,) = mean_scores(values.reshape(-1), np.repeat(sample.clusters, values.shape[1]), seed=seed)
        rows.append({"checkpoint": name, "metric": "loss", "tau": 1, "target": "next token", "split": POOLED,
                     **estimate.columns()})
    return rows
