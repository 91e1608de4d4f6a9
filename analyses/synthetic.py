"""The synthetic pre-caching experiment (Wu, Morris & Levine 2024, §2), end to end.

Train a vanilla and a myopic twin (same config, data stream and seed), then on fresh held-out sequences
report each one's Huber loss beside the trivial baseline (predict 0), and probe every residual layer for
sin(freq · x_{t−j}) and x_{t−j}, j = 0 … n_terms + 2 — for both twins and for the same architecture at
random initialisation (the control: a random nonlinear expansion of x_t already decodes sin(freq · x_t)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch.nn.functional import huber_loss

from forethought.analyses.causal import CAUSAL_COLUMNS, NET, effect_rows, erasers
from forethought.analyses.experiment import ExperimentConfig, ExperimentResults, finish_run, prepare_out, writes_run
from forethought.analyses.plots import PALETTE, interval_line, loss_curves_figure, probe_r2_figure
from forethought.analyses.results import CONTROL, run_meta, tidy
from forethought.core.errors import ForethoughtError
from forethought.models.gpt2 import GPT2RegressionModel, build_regression, load_model, regression_config
from forethought.models.tasks.synthetic import SyntheticTask
from forethought.models.train import TrainSettings, train
from forethought.models.twins import TWINS
from forethought.probes.erasure import ErasureFit
from forethought.probes.fit import fit_ridge_by_layer
from forethought.probes.metrics import mean_scores
from forethought.probes.paths import edited_positions, path_effects
from forethought.probes.residuals import model_residuals
from forethought.probes.split import split_sequences


@dataclass
class SyntheticConfig(ExperimentConfig):
    """Settings of ``forethought synthetic``; every field is also a command-line flag.

    The ``paper`` preset is the paper's setting; ``cpu`` (what ``forethought demo`` runs) changes the
    model size (d_model 64, context 32), steps, batch and the task's freq so that both twins train and are probed
    in about three minutes on 2 CPU cores.
    """

    # task
    p: float = 1.0  # probability that y_t is the sine sum (otherwise y_t = x_t)
    n_terms: int = 10  # y[t] sums sin(`freq` · x[t − i]) over i = 1 … `n_terms`
    freq: float = 10.0  # frequency of the sine
    seq_len: int = 64  # positions per sequence
    # model: GPT-2 trunk, MLP width 4·d_model, ReLU, no dropout
    n_layer: int = 2  # transformer blocks
    d_model: int = 128  # residual width
    n_head: int = 2  # attention heads
    # training (identical for both twins; the paper did not clip)
    steps: int = 20000  # optimiser steps per twin
    training: TrainSettings = field(default_factory=lambda: TrainSettings(
        batch_size=512, lr=1e-3, grad_clip=0.0, eval_every=500, checkpoint_every=2000))
    # held-out evaluation and probes
    heldout_sequences: int = 4000  # fresh sequences for the losses and the probes
    test_fraction: float = 0.25  # share of held-out sequences the probes are scored on
    ridge_alpha: float = 1e-4  # ridge penalty of the linear probes
    causal: bool = True  # also erase sin(freq · x_t) from each layer and read where the loss moves (docs/causal.md)
    vanilla_checkpoint: str | None = None  # evaluate this trained twin (a checkpoint folder) instead of training one
    myopic_checkpoint: str | None = None  # evaluate this trained myopic twin instead of training one
    out: str = "runs/synthetic"  # run folder: results, checkpoints, figures (resumed when rerun)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},  # the dataclass defaults are the paper's setting
        "cpu": {  # seq_len 32: at 64 the same token budget leaves vanilla at 0.35 × trivial (README)
            "freq": 5.0, "seq_len": 32, "d_model": 64, "steps": 3000, "batch_size": 128,
            "heldout_sequences": 2000, "eval_every": 250, "checkpoint_every": 1000, "out": "runs/demo",
        },
    }

    def __post_init__(self):
        super().__post_init__()
        self.task()  # validates p, n_terms, seq_len
        if self.heldout_sequences < 8:
            raise ForethoughtError(f"heldout_sequences must be at least 8, got {self.heldout_sequences}")
        if self.seq_len <= self.n_terms + 2:
            raise ForethoughtError(
                f"seq_len={self.seq_len} leaves no position with all lookbacks 0 … n_terms + 2 = {self.n_terms + 2}"
            )

    def task(self) -> SyntheticTask:
        return SyntheticTask(p=self.p, n_terms=self.n_terms, freq=self.freq, seq_len=self.seq_len)

    def model_config(self):
        return regression_config(
            in_dim=SyntheticTask.in_dim, out_dim=SyntheticTask.out_dim, n_layer=self.n_layer,
            d_model=self.d_model, n_head=self.n_head, n_positions=self.seq_len, activation="relu",
        )


@dataclass
class SyntheticResults(ExperimentResults):
    """What :func:`run_synthetic` found: the tidy table plus training histories."""

    CONFIG: ClassVar[type] = SyntheticConfig

    def losses(self) -> pd.DataFrame:
        """Held-out Huber loss per model with CI, and its ratio to the trivial baseline."""
        rows = self.table[self.table["metric"] == "huber"].set_index("checkpoint")
        trivial = rows.loc["trivial (predict 0)", "value"]
        return rows[["value", "ci_low", "ci_high", "n"]].assign(ratio_to_trivial=rows["value"] / trivial)

    def r2(self, target: str = "sin", lookback: int = 0) -> pd.DataFrame:
        """R² (layers × models) of the probe for ``target`` of x_{t−lookback}."""
        rows = self.table[(self.table["metric"] == "r2") & (self.table["target"] == target)
                          & (self.table["tau"] == -lookback)]
        return rows.pivot(index="layer", columns="checkpoint", values="value")[[*TWINS, CONTROL]]

    def causal(self, edit: str = NET) -> pd.DataFrame:
        """Δ Huber loss when sin(freq · x_t) is erased from h[l, t]: (checkpoint, layer) rows × offset k columns
        (0: at t, the own path; 1 … n_terms: the positions whose target sums sin(freq · x_t)), ``edit`` "leace",
        "random" or (default) their paired difference."""
        rows = self.table[(self.table["metric"] == "delta_huber") & (self.table["edit"] == edit)
                          & self.table["offset"].notna()]
        return rows.pivot_table(index=["checkpoint", "layer"], columns="offset", values="value")

    def causal_figure(self) -> go.Figure:
        """Per layer, Δ Huber by offset k for each model: LEACE of sin(freq · x_t) minus random directions."""
        rows = self.table[(self.table["metric"] == "delta_huber") & (self.table["edit"] == NET)
                          & self.table["offset"].notna()]
        layers = sorted(rows["layer"].unique())
        figure = make_subplots(rows=1, cols=len(layers), shared_yaxes=True,
                               subplot_titles=[f"erased at layer {layer}" for layer in layers])
        for name, color in zip(rows["checkpoint"].unique(), PALETTE):
            for column, layer in enumerate(layers, start=1):
                interval_line(figure, rows[(rows["checkpoint"] == name) & (rows["layer"] == layer)], "offset", name,
                              column, color=color)
        figure.add_hline(y=0, line=dict(color="gray", dash="dot"))
        figure.update_xaxes(title_text="offset k (loss at t + k)", dtick=1)
        figure.update_yaxes(title_text="Δ Huber, LEACE − random", col=1)
        figure.update_layout(title=f"Synthetic task: erasing sin({self.config.freq:g}·x[t]) from h[l, t]<br><sup>"
                                   f"the loss at t (own path) and at t + 1 … t + {self.config.n_terms} (future path), "
                                   "beyond random directions of equal rank; 95% CI over sequences</sup>",
                             margin=dict(t=100))
        return figure

    def probe_figure(self) -> go.Figure:
        return probe_r2_figure(
            self.table.replace({"target": {"sin": f"sin({self.config.freq:g}·x)"}}),
            title=f"Synthetic task ({self.config.preset} preset): ridge-probe R² for sin({self.config.freq:g}·x[t−j]) "
                  "and x[t−j] by layer, held-out sequences, 95% CI",
        )

    def loss_figure(self) -> go.Figure:
        trivial = float(self.losses().loc["trivial (predict 0)", "value"])
        return loss_curves_figure(self.histories, baseline=trivial, baseline_name="trivial (predict 0)",
                                  title=f"Synthetic task ({self.config.preset} preset): Huber loss")

    def figures(self) -> dict[str, go.Figure]:
        figures = {"synthetic_probe_r2": self.probe_figure()}
        if self.histories:  # none when both twins came from given checkpoints
            figures["synthetic_loss"] = self.loss_figure()
        if (self.table["metric"] == "delta_huber").any():
            figures["synthetic_causal"] = self.causal_figure()
        return figures

    def summary(self) -> str:
        """A few lines for the terminal."""
        losses = self.losses()
        lines = ["held-out Huber loss (95% CI)                ratio to trivial"]
        for name, row in losses.iterrows():
            lines.append(f"  {name:<20} {row.value:.4f} ({row.ci_low:.4f}–{row.ci_high:.4f})   "
                         f"{row.ratio_to_trivial:.2f}")
        r2 = self.r2()
        lines.append(f"probe R² for sin({self.config.freq:g}·x_t) by layer:")
        lines.append("  layer  " + "  ".join(f"{name:>11}" for name in r2.columns))
        for layer, row in r2.iterrows():
            lines.append(f"  {layer:>5}  " + "  ".join(f"{round(v, 3) + 0.0:>11.3f}" for v in row))  # no -0.000
        return "\n".join(lines)


@writes_run
def run_synthetic(config: SyntheticConfig) -> SyntheticResults:
    """Train (or load) the twins, evaluate, probe, and write table, meta and figures into ``config.out``."""
    task = config.task()
    models: dict[str, GPT2RegressionModel] = {
        name: load_model(path, kind="regression").float()
        for name in TWINS if (path := getattr(config, f"{name}_checkpoint")) is not None
    }  # loaded first: a bad checkpoint fails before anything is written
    expected = config.model_config()
    for name, model in models.items():
        for key in ("n_layer", "n_embd", "n_head", "in_dim", "out_dim"):
            if getattr(model.config, key) != getattr(expected, key):
                raise ForethoughtError(
                    f"{name} checkpoint {getattr(config, f'{name}_checkpoint')} has {key}="
                    f"{getattr(model.config, key)}, but the settings say {getattr(expected, key)}"
                )
    out = prepare_out(config.out, config)
    histories: dict[str, list[dict[str, float]]] = {}
    for name in TWINS:
        if name in models:
            continue
        result = train(build_regression(config.model_config(), seed=config.seed), task,
                       config.train_config(myopic=name == "myopic", steps=config.steps), out / name)
        models[name], histories[name] = result.model, result.history
    models[CONTROL] = build_regression(config.model_config(), seed=config.seed)
    models = {name: models[name] for name in (*TWINS, CONTROL)}

    inputs, targets = task.sample(config.heldout_sequences, torch.Generator().manual_seed(config.seed + 2_000_003))
    rows = [*_loss_rows(models, task, inputs, targets), *_probe_rows(models, task, inputs, config)]
    if config.causal:
        rows += _causal_rows(models, task, inputs, targets, config)
    table = tidy(rows, extra=CAUSAL_COLUMNS, task="synthetic", split="heldout", seed=config.seed)
    results = SyntheticResults(config=config, table=table, histories=histories)
    finish_run(results, out, run_meta(
        data=task.describe(),
        heldout=f"{config.heldout_sequences} fresh sequences (generator seed {config.seed + 2_000_003})",
        processing_mode="raw (Hugging Face forward hooks)",
    ))
    return results


@torch.no_grad()
def _predict(model: GPT2RegressionModel, inputs: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device)).squeeze(-1).float().cpu() for chunk in inputs.split(batch)])


def _loss_rows(models, task: SyntheticTask, inputs, targets) -> list[dict[str, Any]]:
    """Held-out Huber loss per model and for predicting 0, CI over sequences."""
    sequence_ids = np.repeat(np.arange(len(inputs)), inputs.shape[1])
    predictions = {name: _predict(model, inputs) for name, model in models.items()}
    predictions["trivial (predict 0)"] = torch.zeros_like(targets)
    rows = []
    for name, predicted in predictions.items():
        per_position = huber_loss(predicted, targets, reduction="none").flatten().numpy()
        (estimate,) = mean_scores(per_position, sequence_ids)
        rows.append({"checkpoint": name, "target": "y", "metric": "huber", **estimate.columns()})
    return rows


def _probe_rows(models, task: SyntheticTask, inputs, config: SyntheticConfig) -> list[dict[str, Any]]:
    """Ridge-probe R² per (model, layer, target, lookback) on held-out sequences."""
    lookbacks = range(task.n_terms + 3)
    columns, labels = [], {}
    for lookback in lookbacks:
        for target, values in task.features(inputs, lookback).items():
            columns.append(values)
            labels[f"{target}(x[t-{lookback}])"] = (target, -lookback)
    targets = torch.stack(columns, dim=-1).numpy()  # [sequences, seq, targets]
    positions = np.arange(max(lookbacks), task.seq_len)  # every lookback defined
    split = split_sequences(len(inputs), config.test_fraction, seed=config.seed)
    layers = list(range(config.n_layer + 1))
    rows = []
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        residuals = torch.cat(
            [model_residuals(model, chunk.to(device)).float().cpu() for chunk in inputs.split(512)], dim=1
        )  # [layers, sequences, seq, d_model]
        fitted = fit_ridge_by_layer(residuals.numpy(), targets, list(labels), layers, positions, split,
                                    alpha=config.ridge_alpha)
        for row in fitted.to_dict("records"):
            row["target"], row["tau"] = labels[row["target"]]
            rows.append({**row, "checkpoint": name, "probe": "ridge"})
    return rows


def _causal_rows(models, task: SyntheticTask, inputs, targets, config: SyntheticConfig) -> list[dict[str, Any]]:
    """Erase sin(freq · x_t) from h[l, t] — LEACE fitted on the probes' training sequences, beside random whitened
    directions of the same rank (1) — one position t at a time on the test sequences, and read the change in Huber
    loss at t + k, k = 0 … n_terms + 1: y[t] does not contain sin(freq · x_t) (own path, k = 0), y[t + k] does for
    k = 1 … n_terms (future path), y[t + n_terms + 1] again does not."""
    train, test = split_sequences(len(inputs), config.test_fraction, seed=config.seed)
    concept = torch.sin(task.freq * inputs[train][..., 0]).reshape(-1)  # [train sequences · seq]
    max_offset = task.n_terms + 1
    positions = edited_positions(task.seq_len, 8, max_offset, lag=0)

    def huber(model: GPT2RegressionModel, cut: torch.Tensor, batch: int) -> np.ndarray:  # [n, length]
        return huber_loss(_predict(model, cut, batch), targets[test][:, : cut.shape[1]], reduction="none").double(
            ).numpy()

    rows = []
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            residuals = model_residuals(model, inputs[train].to(next(model.parameters()).device)).cpu()
        clean: dict[int, np.ndarray] = {}
        for layer in range(config.n_layer + 1):
            fit = ErasureFit.from_values(residuals[layer].reshape(-1, residuals.shape[-1]), concept)
            effects = {edit: path_effects(model, inputs[test], partial(eraser.at, layer), positions, max_offset,
                                          512, clean, huber, lag=0)
                       for edit, eraser in erasers(fit, 1, config.seed).items()}
            cell = {"checkpoint": name, "layer": layer, "tau": 0, "target": "sin", "probe": "leace", "rank": 1}
            rows += effect_rows(cell, effects, test, config.seed, metric="delta_huber")
    return rows
