"""Causal tests (``forethought intervene``): is what h[l, t] holds about x[t+τ] used, and by whom?

For each checkpoint, residual layer l and offset τ, the linear information about x[t+τ] in h[l, t] (the topk
probes' classes: the K most frequent tokens + "other") is erased by LEACE fitted on the probe-training documents
(:mod:`probes.erasure`), at each rank of a sweep and at full rank, beside a control of the same rank and whitened
variance in random directions. Each edit is made at one position t of the held-out test documents at a time, and
the change in next-token loss is read at t (the **own path**: t's own prediction) and at t + 1 … t + τ (the
**future path**: later positions read t only through its keys and values; :mod:`probes.paths` shows the two
routes split one edited run exactly). Every effect has a 95 % interval resampling documents; "leace − random" is
the paired difference, the effect beyond an equally large edit.

Reading: information used by later positions but not by t itself — future path beyond control, own path not —
is **pre-cached**; used by both, a **breadcrumb** (computed for t, read again later). For a myopic twin the
future path gets no training signal, so its future-path effect is what untrained reading of t's keys and values
gives. Beside every effect: what a freshly fitted least-squares linear probe still explains of the concept after
the edit (R² ≤ 0 at full rank: the erasure worked) and the raw variance each edit removed.
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

from forethought.analyses.causal import CAUSAL_COLUMNS, LEACE, NET, RANDOM, effect_rows, erasers
from forethought.analyses.engine import Probing, load_checkpoints
from forethought.analyses.experiment import ExperimentResults, finish_run, prepare_out, writes_run
from forethought.analyses.plots import FDR_NOTE, PALETTE, difference_heatmap
from forethought.analyses.probing import ProbeSettings, check_names
from forethought.analyses.results import run_meta, tidy
from forethought.core.errors import ForethoughtError
from forethought.core.settings import check_settings
from forethought.models.heldout import token_losses
from forethought.models.train import resolve_device
from forethought.probes.erasure import ConceptEraser, ErasureFit, linear_r2, mlp_gain
from forethought.probes.metrics import POOLED, mean_scores
from forethought.probes.paths import path_effects

CHECK_FIT_ROWS, CHECK_TEST_ROWS = 100_000, 20_000  # positions the erasure check fits and scores its probe on


@dataclass
class InterveneConfig:
    """Settings of ``forethought intervene``; every field is also a command-line flag."""

    checkpoints: dict[str, str] = field(default_factory=dict)  # {name: folder, hub id, smollm2-135m or gguf:PATH}
    corpus: str | None = None  # held-out text from another corpus (default: the checkpoints' own test documents)
    layout: str = "first"  # with corpus: 'first' or 'packed'
    seq_len: int = 64  # with corpus: sequence length
    tokens_root: str = "runs/tokens"
    max_sequences: int = 400  # held-out sequences: erasers fitted on the probe-training documents, edits on test
    layers: tuple[int, ...] | None = None  # residual layers 0 … L (None, on the command line 'all': every one)
    taus: tuple[int, ...] = (1, 2, 3, 4)  # the concept: x[t+τ]
    top_k: int = 64  # the concept's classes: the K most frequent training tokens + "other" (K < d_model)
    ranks: tuple[int, ...] = (1, 4, 16, 64)  # erasure ranks (capped at the concept's); full rank is always added
    positions: int = 8  # positions t edited per sequence (evenly spaced; one edited run each)
    batch_sequences: int = 64
    seed: int = 0  # probe split, the control's directions, bootstrap
    device: str = "auto"
    precision: str = "float32"  # the cached residuals' forward (bfloat16: faster on AMX CPUs); edits run in float32
    out: str = "runs/intervene"
    figures_dir: str | None = None  # also copy the figures here
    progress: bool = True

    def __post_init__(self):
        check_settings(self)
        check_names(self.checkpoints)
        if not self.checkpoints:
            raise ForethoughtError("give --checkpoints NAME=PATH,...")
        if not self.ranks or min(self.ranks) < 1:
            raise ForethoughtError(f"ranks must be ≥ 1, got {', '.join(map(str, self.ranks)) or 'none'}")
        self.probe_settings()  # held-out, layer and τ settings are checked as the probes' are

    def probe_settings(self) -> ProbeSettings:
        """The held-out sample, split and residual caches are the probing engine's, with topk classes."""
        return ProbeSettings(corpus=self.corpus, layout=self.layout, seq_len=self.seq_len, tokens_root=self.tokens_root,
                             max_sequences=self.max_sequences, layers=self.layers, taus=self.taus, kind="topk",
                             top_k=self.top_k, batch_sequences=self.batch_sequences, random_init=False,
                             seed=self.seed, device=self.device, precision=self.precision, progress=self.progress)


@dataclass
class InterveneResults(ExperimentResults):
    """Δloss per (checkpoint, layer, τ, edit, rank, path, offset) with intervals, and the erasure checks."""

    CONFIG: ClassVar[type] = InterveneConfig

    def effects(self, checkpoint: str, edit: str = NET, rank: int | None = None) -> pd.DataFrame:
        """Own-path and summed future-path Δloss (columns) per (layer, τ) (rows) at ``rank`` (None: full)."""
        rows = self._cell_rows(checkpoint, edit, rank)
        rows = rows[rows["offset"].isna() | (rows["path"] == "own")]
        return rows.pivot_table(index=["layer", "tau"], columns="path", values="value")

    def checks(self, checkpoint: str) -> pd.DataFrame:
        """The erasure checks per (layer, τ, edit, rank): what a fresh linear probe explains of the concept after
        the edit (R²; edit "none": before) and the raw variance removed."""
        rows = self.table[(self.table["checkpoint"] == checkpoint)
                          & self.table["metric"].isin(["linear_r2_after", "mlp_gain_after", "removed_variance"])]
        return rows.pivot_table(index=["layer", "tau", "edit", "rank"], columns="metric", values="value")

    def _cell_rows(self, checkpoint: str, edit: str, rank: int | None) -> pd.DataFrame:
        rows = self.table[(self.table["checkpoint"] == checkpoint) & (self.table["metric"] == "delta_loss")
                          & (self.table["edit"] == edit)]
        full = rows.groupby(["layer", "tau"])["rank"].transform("max")
        return rows[rows["rank"] == full] if rank is None else rows[rows["rank"] == rank]

    def paths_figure(self, checkpoint: str) -> go.Figure:
        """Δloss by layer, own path and future path, the LEACE edit and its random control (full rank), one
        panel per τ."""
        taus = sorted(self.table["tau"].dropna().unique())
        figure = make_subplots(rows=1, cols=len(taus), shared_yaxes=True,
                               subplot_titles=[f"x[t+{tau}] erased" for tau in taus])
        colors = iter(PALETTE)
        for edit in (LEACE, RANDOM):
            rows = self._cell_rows(checkpoint, edit, None)
            for path, dash in (("own", "solid"), ("future", "dash")):
                color = next(colors)
                chosen = rows[(rows["path"] == path) & (rows["offset"].isna() if path == "future" else True)]
                for column, tau in enumerate(taus, start=1):
                    line = chosen[chosen["tau"] == tau].sort_values("layer")
                    figure.add_scatter(
                        x=line["layer"].astype(int), y=line["value"], mode="lines+markers", name=f"{edit}, {path}",
                        line=dict(color=color, dash=dash), showlegend=column == 1, row=1, col=column,
                        error_y=dict(type="data", symmetric=False, array=line["ci_high"] - line["value"],
                                     arrayminus=line["value"] - line["ci_low"]))
        figure.add_hline(y=0, line=dict(color="gray", dash="dot"))
        figure.update_xaxes(title_text="residual layer l", dtick=1)
        figure.update_yaxes(title_text="Δ loss, nats (own: at t; future: t+1 … t+τ summed)", col=1)
        figure.update_layout(title=f"{checkpoint}: erasing x[t+τ] from h[l, t] — where the loss moves (full-rank "
                                   "LEACE vs random directions of equal rank; 95% CI over documents)")
        return figure

    def future_heatmap(self, checkpoint: str) -> go.Figure:
        """Layer × τ: the future path's Δloss beyond the control (full rank), "n.s." marks by FDR over the grid."""
        rows = self._cell_rows(checkpoint, NET, None)
        rows = rows[(rows["path"] == "future") & rows["offset"].isna()]
        return difference_heatmap(rows, f"{checkpoint}: future-path Δloss, LEACE − random (full rank). {FDR_NOTE}",
                                  "Δ loss (nats)")

    def figures(self) -> dict[str, go.Figure]:
        figures = {}
        for name in self.table["checkpoint"].dropna().unique():
            stem = str(name).replace(" ", "_").replace("/", "_")
            figures[f"intervene_{stem}_paths"] = self.paths_figure(name)
            figures[f"intervene_{stem}_future_heatmap"] = self.future_heatmap(name)
        return figures

    def summary(self) -> str:
        lines = ["Δ loss when x[t+τ] is erased from h[l, t] at full rank, beyond random directions of the same rank "
                 "(own: at t; future: t+1 … t+τ summed); layers × τ:"]
        for name in self.table["checkpoint"].dropna().unique():
            effects = self.effects(name).unstack("tau")
            lines += [f"{name}:", effects.to_string(float_format=lambda v: f"{v:+.4f}")]
        return "\n".join(lines)


@writes_run
def run_intervene(config: InterveneConfig) -> InterveneResults:
    """Fit the erasers, edit each test position, read the own- and future-path effects; write table and figures."""
    settings = config.probe_settings()
    engine = Probing(load_checkpoints(dict(config.checkpoints)), settings, config.out)
    tokens = engine.tokens
    taus = settings.tau_list()
    last = tokens.shape[1] - max(taus) - 2  # the last position whose offsets all have a loss
    if last < 0:
        raise ForethoughtError(f"taus reach {max(taus)}, but the held-out sequences have {tokens.shape[1]} tokens: "
                               f"the causal test needs at least {max(taus) + 2}")
    for name in engine.names:
        engine.layers(name)  # layers exist
        width = engine.checkpoint(name).model.config.hidden_size
        if config.top_k >= width:
            raise ForethoughtError(
                f"top_k {config.top_k}: the concept's {config.top_k} + 1 classes can span all {width} residual "
                f"dimensions of {name}, and then full-rank erasure removes everything and its random control is the "
                f"same edit; choose a top_k below {width}")
    out = prepare_out(config.out, config)
    device = resolve_device(config.device)
    split = engine.split(settings.probe_config(str(device)))
    classes = np.full(int(tokens.max()) + 1, len(split.classes))  # token → class; "other" last
    classes[split.classes] = np.arange(len(split.classes))
    positions = sorted(set(np.linspace(0, last, min(config.positions, last + 1)).round().astype(int).tolist()))
    test = torch.from_numpy(tokens[split.test])
    clusters = engine.sample.clusters[split.test]
    rows: list[dict[str, Any]] = []
    for name in engine.names:
        model = engine.checkpoint(name).model.to(device).float().eval()
        cache = engine.cache(name)
        losses = token_losses(model, test, config.batch_sequences)
        (loss,) = mean_scores(losses.reshape(-1), np.repeat(clusters, losses.shape[1]), seed=config.seed)
        clean: dict[int, np.ndarray] = {}  # unedited losses by input length, shared by every edit of this model
        rows.append({"checkpoint": name, "metric": "loss", "tau": 1, "target": "next token", **loss.columns()})
        for layer in engine.layers(name):
            residuals = cache.layer(layer)  # [n, T, d]
            for tau in taus:
                fit_rows, test_rows = (_concept(residuals, tokens, classes, sequences, tau)
                                       for sequences in (split.train, split.test))
                fit = ErasureFit.from_samples(*fit_rows, len(split.classes) + 1)
                fit_rows = _subsample(fit_rows, CHECK_FIT_ROWS, config.seed)  # the erasure check's rows
                test_rows = _subsample(test_rows, CHECK_TEST_ROWS, config.seed)
                cell = {"checkpoint": name, "layer": layer, "tau": tau, "target": f"x[t+{tau}]"}
                rows += _check_rows(cell, None, fit_rows, test_rows, rank=0, edit="none", seed=config.seed)
                for rank in sorted({min(rank, fit.max_rank) for rank in config.ranks} | {fit.max_rank}):
                    effects = {}
                    for edit, eraser in erasers(fit, rank, config.seed).items():
                        rows += _check_rows(cell, eraser, fit_rows, test_rows, rank=rank, edit=edit, seed=config.seed,
                                            nonlinear=edit == LEACE and rank == fit.max_rank)
                        effects[edit] = path_effects(model, test, partial(eraser.at, layer), positions, tau,
                                                     config.batch_sequences, clean)
                    rows += effect_rows({**cell, "rank": rank}, effects, clusters, config.seed)
    constants = dict(task=f"text: {engine.heldout.corpus}", seed=config.seed, split=POOLED)
    results = InterveneResults(config=config, table=tidy(rows, extra=CAUSAL_COLUMNS, **constants))
    finish_run(results, out, run_meta(
        heldout=engine.sample.composition(), positions=positions, classes=len(split.classes) + 1,
        probe_split={part: getattr(split, part).tolist() for part in ("train", "validation", "test")},
        checkpoints={name: engine.checkpoint(name).source for name in engine.names},
        processing_mode="raw (Hugging Face forward hooks)"))
    return results


def _concept(residuals: np.ndarray, tokens: np.ndarray, classes: np.ndarray, sequences: np.ndarray,
             tau: int) -> tuple[np.ndarray, np.ndarray]:
    """(h[l, t] [m, d], class of x[t+τ] [m]) over every position t < T − τ of ``sequences``."""
    h = np.asarray(residuals[sequences][:, : tokens.shape[1] - tau], dtype=np.float64)
    return h.reshape(-1, h.shape[-1]), classes[tokens[sequences][:, tau:]].reshape(-1)


def _subsample(part: tuple[np.ndarray, np.ndarray], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``n`` rows of (h, labels), drawn without replacement (seeded); all of them if there are fewer."""
    h, labels = part
    if len(h) <= n:
        return h, labels
    kept = np.sort(np.random.default_rng(seed).choice(len(h), n, replace=False))
    return h[kept], labels[kept]


def _check_rows(cell: dict[str, Any], eraser: ConceptEraser | None, fit_rows: tuple[np.ndarray, np.ndarray],
                test_rows: tuple[np.ndarray, np.ndarray], rank: int, edit: str, seed: int,
                nonlinear: bool = False) -> list[dict[str, Any]]:
    """What a least-squares linear probe fitted afresh on the edited training rows explains of the concept on the
    edited test rows (:func:`~probes.erasure.linear_r2`; ≤ 0 after full-rank LEACE), the raw variance the edit
    removed, and (unedited, and with ``nonlinear``) what a one-hidden-layer probe still recovers
    (:func:`~probes.erasure.mlp_gain`: information can survive linear erasure)."""
    (h, labels), (h_test, labels_test) = fit_rows, test_rows
    cell = {**cell, "edit": edit, "rank": rank, "n": len(labels_test)}
    rows = []
    if eraser is not None:
        rows.append({**cell, "metric": "removed_variance", "value": eraser.removed_variance(torch.from_numpy(h_test))})
        h, h_test = (eraser(torch.from_numpy(x)).numpy() for x in (h, h_test))
    rows.append({**cell, "metric": "linear_r2_after", "value": linear_r2(h, labels, h_test, labels_test)})
    if eraser is None or nonlinear:
        rows.append({**cell, "metric": "mlp_gain_after", "value": mlp_gain(h, labels, h_test, labels_test, seed)})
    return rows
