"""The myopia gap and the future-gradient share (``forethought gap``).

Myopia gap: held-out loss(myopic) − loss(vanilla) for twins trained on the same data, overall and per
position, each with a paired 95 % bootstrap interval over held-out sequences (= documents in the paper's
layout). It measures how much the model gains from computing for the future (Wu et al. 2024, §3: GPT-2 on
MS MARCO, 3.28 vs 3.40 nats).

Future-gradient share (any single checkpoint): at residual layer l, ‖g_total − g_own‖ / ‖g_total‖ over
positions and sequences, where g_total is the gradient of the summed next-token loss reaching h[l, t] and
g_own the part from position t's own loss — the gradient under :func:`models.myopic.myopic`. It says how much
of the training signal at each layer asks for computation on behalf of later positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from analyses.experiment import UNBOUND, ExperimentResults, finish_run, prepare_out, writes_run
from analyses.plots import loss_curves_figure
from analyses.results import run_meta, tidy
from models.checkpoint import changed_settings, checkpoint_step, training_history
from models.errors import ForethoughtError
from models.families import architecture_summary
from models.lm import LMCheckpoint, check_same_tokenizer
from models.myopic import myopic, myopic_layers
from models.tasks.text import TextData, next_token_loss
from models.train import resolve_device
from models.settings import check_settings
from probes.metrics import Estimate, bootstrap, mean_scores
from probes.residuals import capture_residuals

TWINS = ("vanilla", "myopic")
GAP = "myopia gap (myopic − vanilla)"
COLORS = px.colors.qualitative.D3


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
    layout: str = "first"  # with corpus: 'first' or 'packed'
    seq_len: int = 64  # with corpus: sequence length
    tokens_root: str = "runs/tokens"
    max_sequences: int = 2000  # held-out sequences for the losses
    share_sequences: int = 64  # held-out sequences for the future-gradient share (two backward passes each)
    batch_size: int = 32
    seed: int = 0  # bootstrap seed
    out: str = "runs/gap"
    figures_dir: str | None = None  # also copy the figures here
    device: str = "auto"  # 'auto': CUDA when available
    progress: bool = True

    def __post_init__(self):
        check_settings(self)
        if self.vanilla is None and self.myopic is None:
            raise ForethoughtError("give --vanilla and/or --myopic checkpoints")
        if min(self.max_sequences, self.share_sequences, self.batch_size) < 1:
            raise ForethoughtError("max_sequences, share_sequences and batch_size must be at least 1")


@dataclass
class GapResults(ExperimentResults):
    """What :func:`run_gap` found: a tidy table of losses, gaps and future-gradient shares."""

    CONFIG: ClassVar[type] = GapConfig

    def losses(self) -> pd.DataFrame:
        """Overall held-out loss per checkpoint (and the gap) with 95 % CI."""
        rows = self.table[(self.table["metric"] == "loss") & self.table["position"].isna()]
        return rows.set_index("checkpoint")[["value", "ci_low", "ci_high", "n"]]

    def by_position(self) -> pd.DataFrame:
        """Loss per position (rows) × checkpoint (columns), the gap included."""
        rows = self.table[(self.table["metric"] == "loss") & self.table["position"].notna()]
        return rows.pivot(index="position", columns="checkpoint", values="value")[list(dict.fromkeys(rows["checkpoint"]))]

    def shares(self) -> pd.DataFrame:
        """Future-gradient share per layer (rows) × checkpoint (columns)."""
        rows = self.table[self.table["metric"] == "future_gradient_share"]
        return rows.pivot(index="layer", columns="checkpoint", values="value")[list(dict.fromkeys(rows["checkpoint"]))]

    def position_figure(self) -> go.Figure:
        rows = self.table[(self.table["metric"] == "loss") & self.table["position"].notna()]
        twins = [name for name in rows["checkpoint"].unique() if name != GAP]
        has_gap = GAP in set(rows["checkpoint"])
        figure = make_subplots(rows=2 if has_gap else 1, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                               subplot_titles=["held-out loss", GAP] if has_gap else None)
        colors = iter(COLORS)
        for row, names in enumerate([twins, [GAP]] if has_gap else [twins], start=1):
            for name in names:
                _band(figure, rows[rows["checkpoint"] == name], name, next(colors), row=row)
        if has_gap:
            figure.add_hline(y=0, line=dict(color="gray", dash="dot"), row=2, col=1)
        figure.update_xaxes(title_text="position t (predicting token t + 1)", row=2 if has_gap else 1, col=1)
        figure.update_yaxes(title_text="nats per token")
        figure.update_layout(title="Loss by position on held-out sequences, 95% CI over sequences")
        return figure

    def share_figure(self) -> go.Figure:
        rows = self.table[self.table["metric"] == "future_gradient_share"]
        figure = go.Figure()
        for name, color in zip(rows["checkpoint"].unique(), COLORS):
            _band(figure, rows[rows["checkpoint"] == name], name, color, x="layer")
        figure.update_xaxes(dtick=1)
        figure.update_layout(
            title="Future-gradient share: ‖g_total − g_own‖ / ‖g_total‖ at each residual layer, 95% CI",
            xaxis_title="residual layer l (0 = embeddings)", yaxis_title="share of the gradient from later positions",
            yaxis_range=[0, 1.05],
        )
        return figure

    def figures(self) -> dict[str, go.Figure]:
        figures = {}
        if self.histories:
            figures["gap_training_loss"] = loss_curves_figure(
                self.histories, title="Training of the checkpoints: train loss and validation loss by step")
        if (self.table["metric"] == "future_gradient_share").any():
            figures["gap_future_gradient_share"] = self.share_figure()
        if (self.table["metric"] == "loss").any():
            figures["gap_loss_by_position"] = self.position_figure()
        return figures

    def summary(self) -> str:
        lines = ["held-out loss, nats per token (95% CI)"]
        for name, row in self.losses().iterrows():
            lines.append(f"  {name:<30} {row.value:.4f} ({row.ci_low:.4f}–{row.ci_high:.4f})  n={row.n}")
        shares = self.shares()
        if shares.empty:
            return "\n".join(lines)
        lines.append("future-gradient share by layer:")
        lines.append("  layer  " + "  ".join(f"{name:>10}" for name in shares.columns))
        for layer, row in shares.iterrows():
            lines.append(f"  {layer:>5}  " + "  ".join(f"{v:>10.3f}" for v in row))
        return "\n".join(lines)


def _band(figure: go.Figure, rows: pd.DataFrame, name: str, color: str, x: str = "position",
          row: int | None = None) -> None:
    """A line of ``value`` over column ``x`` with a shaded band from ``ci_low`` to ``ci_high``."""
    rows = rows.sort_values(x)
    x = rows[x].astype(int).tolist()
    where = dict(row=row, col=1) if row is not None else {}
    figure.add_scatter(x=x, y=rows["value"], name=name, mode="lines+markers", line=dict(color=color), **where)
    figure.add_scatter(x=x + x[::-1], y=rows["ci_high"].tolist() + rows["ci_low"].tolist()[::-1], fill="toself",
                       mode="lines", line=dict(width=0, color=color), opacity=0.2, showlegend=False,
                       hoverinfo="skip", name=f"{name} 95% CI", **where)


def _batches(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int, desc: str,
             progress: bool) -> Iterator[torch.Tensor]:
    """Chunks [≤ batch_size, T] of ``sequences`` on the model's device, with a progress bar."""
    device = next(model.parameters()).device
    for chunk in tqdm(sequences.split(batch_size), desc=desc, disable=not progress, leave=False):
        yield chunk.to(device)


@torch.no_grad()
def token_losses(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 32,
                 progress: bool = False) -> np.ndarray:
    """sequences [n, T] → per-token cross-entropy [n, T − 1] (position t predicts token t + 1), nats."""
    losses = [next_token_loss(model(chunk, use_cache=False).logits, chunk, reduction="none").cpu()
              for chunk in _batches(model, sequences, batch_size, "losses", progress)]
    return torch.cat(losses).double().numpy()


def residual_gradients(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [batch, T] → gradient of the summed next-token loss at every residual layer [L+1, batch, T, d].

    Under :func:`models.myopic.myopic`, h[l, t] receives only position t's own loss. The token embeddings enter
    as a leaf that requires grad, so every h[l] does even where the embedding weights are frozen (a Llama's
    h[0] is its token embeddings alone).
    """
    embeddings = model.get_input_embeddings()(tokens).detach().requires_grad_()
    with capture_residuals(model, retain_grad=True) as captured:
        logits = model(inputs_embeds=embeddings, use_cache=False).logits
        next_token_loss(logits, tokens, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return torch.stack([captured[layer].grad for layer in sorted(captured)])


def future_gradient_stats(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 16,
                          progress: bool = False) -> np.ndarray:
    """Per-sequence sufficient statistics [n, 2·(L+1)]: ‖g_total − g_own‖² and ‖g_total‖² per layer."""
    stats = []
    for chunk in _batches(model, sequences, batch_size, "gradient share", progress):
        total = residual_gradients(model, chunk).double()  # [L+1, b, T, d]
        with myopic(model):
            own = residual_gradients(model, chunk).double()
        future = (total - own).pow(2).sum((2, 3))  # [L+1, b]
        stats.append(torch.cat([future, total.pow(2).sum((2, 3))]).T.cpu())  # [b, 2·(L+1)]
    return torch.cat(stats).numpy()


def future_gradient_share(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 16,
                          seed: int = 0, progress: bool = False) -> list[Estimate]:
    """The future-gradient share of each residual layer 0 … L, with 95 % bootstrap CIs over sequences."""
    stats = future_gradient_stats(model, sequences, batch_size, progress)
    n_layers = stats.shape[1] // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return bootstrap(stats, lambda s: np.sqrt(s[..., :n_layers] / s[..., n_layers:]),
                         n_examples=len(stats) * sequences.shape[1], seed=seed)


def check_twins(vanilla: LMCheckpoint, myopic_twin: LMCheckpoint) -> None:
    """Refuse twins that differ in architecture, tokenizer or training data, or that are not what they say."""
    ours, theirs = architecture_summary(vanilla.model.config), architecture_summary(myopic_twin.model.config)
    differing = [k for k in dict.fromkeys([*ours, *theirs]) if ours.get(k) != theirs.get(k)]
    if differing:
        detail = ", ".join(f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in differing)
        raise ForethoughtError(f"the twins differ in architecture: {detail}")
    check_same_tokenizer({"vanilla": vanilla, "myopic": myopic_twin})
    if vanilla.data() != myopic_twin.data():
        raise ForethoughtError(f"the twins were trained on different data: {vanilla.data()} vs {myopic_twin.data()}")
    for name, checkpoint in zip(TWINS, (vanilla, myopic_twin)):
        trained_myopic = (checkpoint.description or {}).get("myopic")
        if trained_myopic is not None and trained_myopic != (name == "myopic"):
            raise ForethoughtError(
                f"--{name} {checkpoint.source} was trained {'myopically' if trained_myopic else 'the vanilla way'}"
            )
    settings = [_twin_settings(checkpoint) for checkpoint in (vanilla, myopic_twin)]
    if None not in settings and (changed := changed_settings(*settings)):
        raise ForethoughtError(f"the twins were trained with other settings (vanilla → myopic: {changed})")
    steps = [checkpoint_step(checkpoint.source) for checkpoint in (vanilla, myopic_twin)]
    if steps[0] != steps[1]:
        planned = [(c.description or {}).get("steps") for c in (vanilla, myopic_twin)]
        detail = ", ".join(f"{name} at step {step}" + (f" of {total}" if total else "")
                           for name, step, total in zip(TWINS, steps, planned))
        raise ForethoughtError(f"the twins are not at the same training step ({detail}): finish the shorter run, or "
                               "pass checkpoint folders of the same step")


def _twin_settings(checkpoint: LMCheckpoint) -> dict[str, Any] | None:
    """The training settings a twin recorded (None if it records none), less what twins differ in or what never
    changes the weights (the myopic flag and cut; where the run and its token files are kept)."""
    recorded = (checkpoint.description or {}).get("train_config")
    ignored = {"myopic", "myopic_cut", "eval_batches", *UNBOUND}
    return None if recorded is None else {k: v for k, v in recorded.items() if k not in ignored}


def heldout_data(checkpoints: dict[str, LMCheckpoint], corpus: str | None, layout: str, seq_len: int,
                 prepend_bos: bool | None = None) -> TextData:
    """The checkpoints' own data (their test documents are held out), or ``corpus`` cut by layout and length;
    ``prepend_bos`` (None: as the data was recorded, or no BOS for ``corpus``) sets the BOS policy."""
    if corpus is not None:
        return TextData(corpus=corpus, layout=layout, seq_len=seq_len, prepend_bos=bool(prepend_bos))
    recorded = next((c.data() for c in checkpoints.values() if c.data() is not None), None)
    if recorded is None:
        raise ForethoughtError("the checkpoints record no training data (trained elsewhere?): pass --corpus, "
                               "e.g. --corpus embedded")
    return recorded if prepend_bos is None else replace(recorded, prepend_bos=prepend_bos)


@writes_run
def run_gap(config: GapConfig) -> GapResults:
    """Load the checkpoint(s), evaluate held-out losses and gradient shares; write table, meta and figures."""
    checkpoints = {name: LMCheckpoint.load(source) for name in TWINS
                   if (source := getattr(config, name)) is not None}
    if len(checkpoints) == 2:
        check_twins(checkpoints["vanilla"], checkpoints["myopic"])
    data = heldout_data(checkpoints, config.corpus, config.layout, config.seq_len)
    tokenizer = next(iter(checkpoints.values())).tokenizer
    test = torch.from_numpy(data.load(tokenizer, config.tokens_root)["test"][: config.max_sequences])
    out = prepare_out(config.out, asdict(config))
    device = resolve_device(config.device)

    rows: list[dict[str, Any]] = []
    losses = {}
    for name, checkpoint in checkpoints.items():
        model = checkpoint.model.to(device).float()
        losses[name] = token_losses(model, test, config.batch_size, config.progress)
        if not myopic_layers(model):  # the share needs the myopic gradient
            print(f"{name}: no future-gradient share — the myopic gradient is implemented for GPT-2, Llama, Mistral, "
                  "Qwen2 and GPT-NeoX attention")
            continue
        shares = future_gradient_share(model, test[: config.share_sequences], config.batch_size,
                                       config.seed, config.progress)
        rows += [{"checkpoint": name, "layer": layer, "metric": "future_gradient_share", **estimate.columns()}
                 for layer, estimate in enumerate(shares)]
    if len(losses) == 2:
        losses[GAP] = losses["myopic"] - losses["vanilla"]  # paired: the same sequences resampled together
    sequence_ids = np.arange(len(test))
    loss_row = {"metric": "loss", "tau": 1, "target": "next token"}
    for name, values in losses.items():  # values [sequences, T − 1]
        (overall,) = mean_scores(values.reshape(-1), np.repeat(sequence_ids, values.shape[1]), seed=config.seed)
        rows.append({"checkpoint": name, **loss_row, **overall.columns()})
        for position, estimate in enumerate(mean_scores(values, sequence_ids, seed=config.seed)):
            rows.append({"checkpoint": name, **loss_row, "position": position, **estimate.columns()})
    table = tidy(rows, task=f"text: {data.corpus}", split="test", seed=config.seed)
    histories = {name: history for name, c in checkpoints.items() if (history := training_history(c.source))}
    results = GapResults(config=config, table=table, histories=histories)
    finish_run(results, out, run_meta(
        data=asdict(data), heldout=f"first {len(test)} sequences of the test documents",
        checkpoints={name: c.source for name, c in checkpoints.items()},
        processing_mode="raw (Hugging Face forward hooks)",
    ))
    return results
