"""The myopia gap and the split of the gradient into own and future parts (``forethought gap``).

Myopia gap: held-out loss(myopic) − loss(vanilla) for twins trained on the same data, overall and per
position (and per text of a mixed corpus), each with a paired 95 % bootstrap interval over held-out documents
(a seeded sample of the test documents, :func:`models.heldout.heldout_sample`). It measures how much the model
gains from computing for the future (Wu et al. 2024, §3: GPT-2 on MS MARCO, 3.28 vs 3.40 nats). Each
checkpoint's future share of the squared gradient and cos(g_own, g_future) per layer: :mod:`probes.gradients`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from forethought.analyses.experiment import ExperimentResults, finish_run, prepare_out, writes_run
from forethought.analyses.plots import PALETTE, loss_curves_figure, measured_layers
from forethought.analyses.results import run_meta, tidy
from forethought.core.errors import ForethoughtError
from forethought.core.settings import check_settings
from forethought.models.checkpoint import training_history
from forethought.models.families import non_embedding_parameters
from forethought.models.heldout import heldout_data, heldout_sample, token_losses
from forethought.models.lm import LMCheckpoint
from forethought.models.myopic import myopic_layers
from forethought.models.train import resolve_device
from forethought.models.twins import TWINS, check_twins
from forethought.probes.gradients import COSINE, SHARE, future_gradient_split
from forethought.probes.metrics import POOLED, mean_scores, text_groups

log = logging.getLogger(__name__)
GAP = "myopia gap (myopic − vanilla)"


@dataclass
class GapConfig:
    """Settings of ``forethought gap``; every field is also a command-line flag.

    Give both twins for the myopia gap, or one checkpoint (e.g. ``--vanilla openai-community/gpt2``) for
    its future-gradient share alone. Held-out data: the test documents of the data the checkpoints were
    trained on (recorded beside them), unless ``corpus`` is set.
    """

    vanilla: str | None = None  # checkpoint folder, run folder (newest checkpoint) or hub id
    myopic: str | None = None  # the myopic twin: same architecture, tokenizer and data
    corpus: str | None = None  # held-out text from another corpus (default: the checkpoints' own data)
    layout: str = "first"  # with `corpus`: 'first' or 'packed'
    seq_len: int = 64  # with `corpus`: sequence length
    tokens_root: str = "runs/tokens"  # token files are written (once) under here
    max_sequences: int = 2000  # held-out sequences for the losses
    share_sequences: int = 64  # held-out sequences for the future-gradient share (two backward passes each)
    batch_size: int = 32  # sequences per forward pass
    seed: int = 0  # bootstrap seed
    out: str = "runs/gap"  # run folder: table, meta.json, figures
    figures_dir: str | None = None  # also copy the figures here
    device: str = "auto"  # 'auto': CUDA when available
    progress: bool = True  # show progress bars

    def __post_init__(self):
        check_settings(self)
        if self.vanilla is None and self.myopic is None:
            raise ForethoughtError("give `vanilla` and/or `myopic` checkpoints")
        if min(self.max_sequences, self.share_sequences, self.batch_size) < 1:
            raise ForethoughtError("max_sequences, share_sequences and batch_size must be at least 1")


@dataclass
class GapResults(ExperimentResults):
    """What :func:`run_gap` found: a tidy table of losses, gaps, future shares and own/future cosines."""

    CONFIG: ClassVar[type] = GapConfig

    def losses(self) -> pd.DataFrame:
        """Overall held-out loss per checkpoint (and the gap) with 95 % CI, over the whole sample."""
        rows = self.table[(self.table["metric"] == "loss") & self.table["position"].isna()]
        return rows.set_index("checkpoint")[["value", "ci_low", "ci_high", "n"]]

    def losses_by_text(self) -> pd.DataFrame:
        """Held-out loss per text of a mixed sample (rows: the whole sample, then "test: <text>") × checkpoint
        (columns), the gap included."""
        rows = pd.concat([self.table, self.by_text])
        rows = rows[(rows["metric"] == "loss") & rows["position"].isna()]
        return rows.pivot(index="split", columns="checkpoint", values="value").loc[
            list(dict.fromkeys(rows["split"])), list(dict.fromkeys(rows["checkpoint"]))]

    def by_position(self) -> pd.DataFrame:
        """Loss per position (rows) × checkpoint (columns), the gap included."""
        rows = self.table[(self.table["metric"] == "loss") & self.table["position"].notna()]
        return rows.pivot(index="position", columns="checkpoint", values="value")[
            list(dict.fromkeys(rows["checkpoint"]))
        ]

    def shares(self, metric: str = SHARE) -> pd.DataFrame:
        """The future share of the squared gradient (or ``metric=COSINE``: cos(g_own, g_future)) per layer (rows)
        × checkpoint (columns)."""
        rows = self.table[self.table["metric"] == metric]
        return rows.pivot(index="layer", columns="checkpoint", values="value")[list(dict.fromkeys(rows["checkpoint"]))]

    def position_figure(self) -> go.Figure:
        rows = self.table[(self.table["metric"] == "loss") & self.table["position"].notna()]
        twins = [name for name in rows["checkpoint"].unique() if name != GAP]
        has_gap = GAP in set(rows["checkpoint"])
        figure = make_subplots(rows=2 if has_gap else 1, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                               subplot_titles=["held-out loss", GAP] if has_gap else None)
        colors = iter(PALETTE)
        for row, names in enumerate([twins, [GAP]] if has_gap else [twins], start=1):
            for name in names:
                _band(figure, rows[rows["checkpoint"] == name], name, next(colors), row=row)
        if has_gap:
            figure.add_hline(y=0, line=dict(color="gray", dash="dot"), row=2, col=1)
        figure.update_xaxes(title_text="position t (predicting token t + 1)", row=2 if has_gap else 1, col=1)
        figure.update_yaxes(title_text="nats per token")
        figure.update_layout(title="Loss by position on held-out sequences, 95% CI over held-out documents")
        return figure

    def share_figure(self) -> go.Figure:
        """Per residual layer: the future share of the squared gradient (top) and cos(g_own, g_future) (bottom)."""
        figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, subplot_titles=[
            "‖g_future‖² / (‖g_own‖² + ‖g_future‖²)", "cos(g_own, g_future)"])
        for row, metric in enumerate((SHARE, COSINE), start=1):
            rows = self.table[(self.table["metric"] == metric) & self.table["value"].notna()]
            for name, color in zip(rows["checkpoint"].unique(), PALETTE):
                _band(figure, rows[rows["checkpoint"] == name], name, color, x="layer", row=row, legend=row == 1)
        figure.add_hline(y=0, line=dict(color="gray", dash="dot"), row=2, col=1)
        measured_layers(figure, self.table.loc[self.table["metric"] == SHARE, "layer"])
        figure.update_xaxes(title_text="residual layer l (0 = embeddings)", row=2, col=1)
        figure.update_yaxes(range=[0, 1.05], row=1, col=1)
        figure.update_yaxes(range=[-1.05, 1.05], row=2, col=1)
        figure.update_layout(title="The gradient reaching each residual layer: later positions' part and its "
                                   "direction, 95% CI over held-out documents")
        return figure

    def figures(self) -> dict[str, go.Figure]:
        figures = {}
        if self.histories:
            figures["gap_training_loss"] = loss_curves_figure(
                self.histories, title="Training of the twins: train loss and held-out loss by step")
        if (self.table["metric"] == SHARE).any():
            figures["gap_future_gradient_share"] = self.share_figure()
        if (self.table["metric"] == "loss").any():
            figures["gap_loss_by_position"] = self.position_figure()
        return figures

    def summary(self) -> str:
        lines = ["held-out loss, nats per token (95% CI)"]
        for name, row in self.losses().iterrows():
            lines.append(f"  {name:<30} {row.value:.4f} ({row.ci_low:.4f}–{row.ci_high:.4f})  n={row.n}")
        texts = self.losses_by_text()
        if len(texts) > 1:
            lines.append("per text: " + "; ".join(f"{split.removeprefix(POOLED + ': ')} " + ", ".join(
                f"{name} {value:.3f}" for name, value in row.items()) for split, row in texts.iloc[1:].iterrows()))
        shares = self.shares()
        if shares.empty:
            return "\n".join(lines)
        cosines = self.shares(COSINE)
        lines.append("future share of the squared gradient | cos(g_own, g_future), by layer:")
        lines.append("  layer  " + "  ".join(f"{name:>21}" for name in shares.columns))
        for layer, row in shares.iterrows():
            cells = (f"{share:>10.3f} | {cosine:>+8.3f}" for share, cosine in zip(row, cosines.loc[layer]))
            lines.append(f"  {layer:>5}  " + "  ".join(cells))
        return "\n".join(lines)


def _band(figure: go.Figure, rows: pd.DataFrame, name: str, color: str, x: str = "position",
          row: int | None = None, legend: bool = True) -> None:
    """A line of ``value`` over column ``x`` with a shaded band from ``ci_low`` to ``ci_high``."""
    rows = rows.sort_values(x)
    x = rows[x].astype(int).tolist()
    where = dict(row=row, col=1) if row is not None else {}
    figure.add_scatter(x=x, y=rows["value"], name=name, mode="lines+markers", line=dict(color=color),
                       showlegend=legend, **where)
    figure.add_scatter(x=x + x[::-1], y=rows["ci_high"].tolist() + rows["ci_low"].tolist()[::-1], fill="toself",
                       mode="lines", line=dict(width=0, color=color), opacity=0.2, showlegend=False,
                       hoverinfo="skip", name=f"{name} 95% CI", **where)


@writes_run
def run_gap(config: GapConfig) -> GapResults:
    """Load the checkpoint(s), evaluate held-out losses and gradient shares; write table, meta and figures."""
    checkpoints = {name: LMCheckpoint.load(source) for name in TWINS
                   if (source := getattr(config, name)) is not None}
    if len(checkpoints) == 2:
        check_twins(checkpoints["vanilla"], checkpoints["myopic"])
    data = heldout_data(checkpoints, config.corpus, config.layout, config.seq_len)
    sample = heldout_sample(data, next(iter(checkpoints.values())).tokenizer, config.tokens_root,
                            config.max_sequences, config.seed)
    test = torch.from_numpy(sample.tokens)
    shared = sample.spread(config.share_sequences)  # the gradient split's sequences
    out = prepare_out(config.out, config)
    device = resolve_device(config.device)

    rows: list[dict[str, Any]] = []
    losses = {}
    for name, checkpoint in checkpoints.items():
        model = checkpoint.model.to(device).float()
        losses[name] = token_losses(model, test, config.batch_size, config.progress)
        if not myopic_layers(model):  # the share needs the myopic gradient
            log.warning("%s: no future-gradient split — the myopic gradient is implemented for GPT-2, Llama, "
                        "Mistral, Qwen2 and GPT-NeoX attention", name)
            continue
        split = future_gradient_split(model, test[shared], config.batch_size, config.seed, config.progress,
                                      clusters=sample.clusters[shared])
        rows += [{"checkpoint": name, "layer": layer, "metric": metric, **estimate.columns()}
                 for metric, by_layer in split.items() for layer, estimate in by_layer.items()]
    if len(losses) == 2:
        losses[GAP] = losses["myopic"] - losses["vanilla"]  # paired: the same sequences resampled together
    loss_row = {"metric": "loss", "tau": 1, "target": "next token"}
    text_rows = []
    for name, values in losses.items():  # values [sequences, T − 1]; intervals resample the sample's clusters
        clusters, texts = (np.repeat(labels, values.shape[1]) for labels in (sample.clusters, sample.texts))
        (overall,) = mean_scores(values.reshape(-1), clusters, seed=config.seed)
        rows.append({"checkpoint": name, **loss_row, **overall.columns()})
        for position, estimate in enumerate(mean_scores(values, sample.clusters, seed=config.seed)):
            rows.append({"checkpoint": name, **loss_row, "position": position, **estimate.columns()})
        for split, where in text_groups(texts, len(texts)):
            (estimate,) = mean_scores(values.reshape(-1)[where], clusters[where], seed=config.seed)
            text_rows.append({"checkpoint": name, **loss_row, "split": split, **estimate.columns()})
    constants = dict(task=f"text: {data.corpus}", seed=config.seed)
    table = tidy(rows, split=POOLED, **constants)
    histories = {name: history for name, c in checkpoints.items() if (history := training_history(c.source))}
    results = GapResults(config=config, table=table, histories=histories,
                         by_text=tidy(text_rows, **constants))
    finish_run(results, out, run_meta(
        data=asdict(data), heldout=sample.composition(), gradient_split_sequences=len(shared),
        checkpoints={name: c.source for name, c in checkpoints.items()},
        parameters={name: non_embedding_parameters(c.model) for name, c in checkpoints.items()},  # for `trend`
        processing_mode="raw (Hugging Face forward hooks)",
    ))
    return results
