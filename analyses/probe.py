"""Future-token probes for checkpoints (``forethought probe``): cache, fit every (layer, τ), score, plot.

For each named checkpoint: its residual streams over held-out text are cached (:mod:`probes.cache`), and one
probe per (layer, τ) predicting x[t+τ] from h[l, t] is fitted and scored on held-out sequences
(:mod:`probes.future`). Beside them: the same probes on a randomly initialised model of the first
checkpoint's architecture (the control), and the unigram / skip-bigram count baselines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from analyses.experiment import ExperimentResults, finish_run, prepare_out
from analyses.gap import heldout_data
from analyses.results import run_meta, tidy
from models.errors import ForethoughtError
from models.gpt2 import build_lm
from models.lm import LMCheckpoint
from models.tasks.text import TextData
from models.train import resolve_device
from probes.baselines import count_baselines
from probes.cache import PROCESSING_MODE, build_cache
from probes.fit import split_sequences
from probes.future import FutureProbeConfig, ProbeScores, fit_future_probes, top_classes

CONTROL = "random init"
LOGIT_LENS = "logit lens"


@dataclass
class ProbeConfig:
    """Settings of ``forethought probe``; every field is also a command-line flag."""

    checkpoints: str = ""  # comma-separated NAME=PATH (checkpoint or run folder, or hub id); PATH alone: its name
    corpus: str | None = None  # held-out text from another corpus (default: the checkpoints' own test documents)
    layout: str = "first"  # with corpus: 'first' or 'packed'
    seq_len: int = 64  # with corpus: sequence length
    tokens_root: str = "runs/tokens"
    max_sequences: int = 2000  # held-out sequences cached and probed (split again for the probes)
    layers: str = "all"  # comma-separated residual layers 0 … L, or 'all'
    taus: str = "1,2,3,4"  # comma-separated offsets τ ≥ 1 (τ = 1: the next token)
    kind: str = "softmax"  # softmax, topk or lens
    top_k: int = 1000  # topk: the K most frequent tokens + "other"
    lr: float = 1e-2  # Adam; 1e-3 left the CPU pair's probes short of the majority class in 10 epochs
    max_epochs: int = 20
    patience: int = 2
    batch_sequences: int = 64  # sequences per minibatch (cache writing and probe fitting)
    random_init: bool = True  # also probe a random-init model of the same architecture (the control)
    seed: int = 0  # probe split, probe training, random-init weights
    out: str = "runs/probe"
    figures_dir: str | None = None  # also copy the figures here
    device: str = "auto"  # 'auto': CUDA when available
    progress: bool = True

    def __post_init__(self):
        FutureProbeConfig(kind=self.kind)  # validates the kind
        if not self.named_checkpoints():
            raise ForethoughtError("give --checkpoints NAME=PATH,...")
        if not self.tau_list() or min(self.tau_list()) < 1:
            raise ForethoughtError(f"taus must be offsets ≥ 1, got {self.taus!r}")

    def named_checkpoints(self) -> dict[str, str]:
        """{name: source}; a name may appear once."""
        named: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in self.checkpoints.split(","))):
            name, _, source = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
            if name in named or name == CONTROL:
                raise ForethoughtError(f"two checkpoints are named {name!r}; name them NAME=PATH")
            named[name] = source
        return named

    def tau_list(self) -> list[int]:
        return _integers(self.taus, "taus")

    def layer_list(self, n_layers: int) -> list[int]:
        layers = list(range(n_layers + 1)) if self.layers == "all" else _integers(self.layers, "layers")
        bad = [layer for layer in layers if not 0 <= layer <= n_layers]
        if bad:
            raise ForethoughtError(f"layers {bad} out of range: the checkpoints have residual layers 0 … {n_layers}")
        return layers

    def probe_config(self, device: str) -> FutureProbeConfig:
        return FutureProbeConfig(kind=self.kind, top_k=self.top_k, lr=self.lr, max_epochs=self.max_epochs,
                                 patience=self.patience, batch_sequences=self.batch_sequences, seed=self.seed,
                                 device=device)

    def results_settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("figures_dir", "device", "progress")}


def _integers(text: str, what: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ForethoughtError(f"{what} must be comma-separated integers, got {text!r}") from None


@dataclass
class ProbeResults(ExperimentResults):
    """Held-out metrics of every (checkpoint, layer, τ) probe, the control and the count baselines."""

    CONFIG: ClassVar[type] = ProbeConfig
    DERIVED: ClassVar[tuple[str, ...]] = ()  # rows computed from other checkpoints' (left out of accuracy plots)

    def _probed(self, metric: str, probe: str | None = None) -> pd.DataFrame:
        """Rows of the fitted probes (or of ``probe``, e.g. the logit lens) for ``metric``, per checkpoint."""
        table = self.table
        return table[(table["metric"] == metric) & (table["probe"] == (probe or self.config.kind))
                     & table["layer"].notna() & ~table["checkpoint"].isin(self.DERIVED)]

    def to_dataframe(self) -> pd.DataFrame:
        """The tidy table (DESIGN.md's columns)."""
        return self.table

    def accuracy(self, metric: str = "top1") -> pd.DataFrame:
        """``metric`` by (checkpoint, τ) rows × layer columns."""
        return self._probed(metric).pivot_table(index=["checkpoint", "tau"], columns="layer", values="value", sort=False)

    def figure(self, metric: str = "top1") -> go.Figure:
        """``metric`` by layer, one line per τ, one panel per checkpoint; skip-bigram baselines dashed, the
        logit lens (τ = 1) dotted."""
        rows = self._probed(metric).assign(
            tau=lambda t: "τ = " + t["tau"].astype(str),
            plus=lambda t: t["ci_high"] - t["value"], minus=lambda t: t["value"] - t["ci_low"])
        figure = px.line(rows, x="layer", y="value", color="tau", facet_col="checkpoint", markers=True,
                         error_y="plus", error_y_minus="minus", color_discrete_sequence=px.colors.qualitative.D3,
                         labels={"layer": "residual layer l", "value": metric},
                         title=f"Future-token probes ({self.config.kind}): held-out {metric} of x[t+τ] from h[l, t], "
                               "95% CI; dashed: skip-bigram, dotted: logit lens (τ = 1)")
        colors = {trace.name: trace.line.color for trace in figure.data}
        lens = self._probed(metric, probe=LOGIT_LENS)
        for column, name in enumerate(dict.fromkeys(rows["checkpoint"]), start=1):
            mine = lens[lens["checkpoint"] == name].sort_values("layer")
            figure.add_scatter(x=mine["layer"].astype(int), y=mine["value"], mode="lines", name="logit lens (τ = 1)",
                               line=dict(dash="dot", color=colors.get("τ = 1", "gray")), showlegend=column == 1,
                               row=1, col=column)
        baselines = self.table[(self.table["probe"] == "skip-bigram") & (self.table["metric"] == metric)]
        for _, row in baselines.iterrows():
            figure.add_hline(y=row["value"], line_dash="dash", line_color=colors.get(f"τ = {row['tau']}", "gray"),
                             row="all", col="all")
        figure.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
        figure.update_xaxes(dtick=1)
        return figure

    def figures(self) -> dict[str, go.Figure]:
        return {f"probe_{self.config.kind}_top1": self.figure()}

    def summary(self) -> str:
        table = self.accuracy()
        lines = ["held-out top-1 of x[t+τ] by layer:", table.to_string(float_format=lambda v: f"{v:.3f}")]
        lens = self._probed("top1", probe=LOGIT_LENS).pivot(index="checkpoint", columns="layer", values="value")
        lines += ["logit lens (τ = 1), top-1 by layer:", lens.to_string(float_format=lambda v: f"{v:.3f}")]
        baselines = self.table[(self.table["checkpoint"] == "baseline") & (self.table["metric"] == "top1")]
        for _, row in baselines.iterrows():
            lines.append(f"  {row['probe']:<12} τ = {row['tau']}: {row['value']:.3f}")
        return "\n".join(lines)


@dataclass
class ProbeRun:
    """What probing a set of checkpoints produced, before it is written: rows, and per-example scores."""

    data: TextData
    tokens: np.ndarray  # [n, seq] the held-out sequences probed
    rows: list[dict[str, Any]]
    scores: dict[str, ProbeScores]  # per checkpoint (and the control)
    sources: dict[str, str]


def probe_checkpoints(config: ProbeConfig, checkpoints: dict[str, LMCheckpoint], out: Path) -> ProbeRun:
    """Cache and probe ``checkpoints`` (and the control) on held-out text; add the count baselines."""
    first = next(iter(checkpoints.values()))
    data = heldout_data(checkpoints, config.corpus, config.layout, config.seq_len)
    tokens = data.load(first.tokenizer, config.tokens_root)["test"][: config.max_sequences]
    layers = config.layer_list(first.model.config.n_layer)
    device = str(resolve_device(config.device))
    if config.random_init:
        build_lm(first.model.config, seed=config.seed).save_pretrained(out / "random-init")
        first.tokenizer.save_pretrained(out / "random-init")
        checkpoints = {**checkpoints, CONTROL: LMCheckpoint.load(out / "random-init")}
    rows: list[dict[str, Any]] = []
    scores: dict[str, ProbeScores] = {}
    for name, checkpoint in checkpoints.items():
        cache = build_cache(checkpoint.source, tokens, out / "caches" / name.replace("/", "_"), layers,
                            config.batch_sequences, device, config.progress)
        model = checkpoint.model.to(device)
        unembed = (model.transformer.ln_f, model.lm_head) if config.kind == "lens" else None
        _, scores[name] = fit_future_probes(cache, layers, config.tau_list(), config.probe_config(device),
                                            vocab_size=model.config.vocab_size, unembed=unembed,
                                            progress=config.progress)
        rows += scores[name].table().assign(checkpoint=name).to_dict("records")
        rows += _logit_lens(cache, layers, config, device, model).assign(checkpoint=name).to_dict("records")
    train, test = split_sequences(len(tokens), config.probe_config(device).test_fraction, seed=config.seed)
    classes = top_classes(tokens[train], config.top_k) if config.kind == "topk" else None  # the probes' classes
    baselines = count_baselines(tokens, train, test, config.tau_list(), first.model.config.vocab_size, classes=classes)
    rows += baselines.assign(checkpoint="baseline").to_dict("records")
    return ProbeRun(data, tokens, rows, scores, {name: c.source for name, c in checkpoints.items()})


def _logit_lens(cache, layers: list[int], config: ProbeConfig, device: str, model) -> pd.DataFrame:
    """The untrained lens — the model's own final LayerNorm and unembedding on h[l] — for τ = 1, scored on
    the probes' held-out positions (the lens grid is built for all τ so the positions match, then kept at τ = 1)."""
    lens_config = replace(config.probe_config(device), kind="lens", max_epochs=0)
    _, scores = fit_future_probes(cache, layers, config.tau_list(), lens_config, vocab_size=model.config.vocab_size,
                                  unembed=(model.transformer.ln_f, model.lm_head))
    table = scores.table()
    return table[table["tau"] == 1].assign(probe=LOGIT_LENS)


def probe_meta(run: ProbeRun) -> dict[str, Any]:
    """Provenance of a probing run for ``meta.json``."""
    return run_meta(data=asdict(run.data), heldout=f"first {len(run.tokens)} sequences of the test documents",
                    checkpoints=run.sources, processing_mode=PROCESSING_MODE)


def run_probe(config: ProbeConfig) -> ProbeResults:
    """Cache and probe every checkpoint (and the control) on held-out text; write table, meta and figures."""
    checkpoints = {name: LMCheckpoint.load(source) for name, source in config.named_checkpoints().items()}
    out = prepare_out(config.out, config.results_settings())
    run = probe_checkpoints(config, checkpoints, out)
    table = tidy(run.rows, task=f"text: {run.data.corpus}", seed=config.seed, target="token x[t+τ]")
    results = ProbeResults(config=config, table=table)
    finish_run(results, out, probe_meta(run))
    return results
