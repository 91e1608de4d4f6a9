"""Probing named checkpoints on held-out text: what ``forethought probe``, ``precache`` and
:class:`analyses.compare.Comparison` share besides the engine (:mod:`analyses.engine`) — the settings
(:class:`ProbeSettings`), checkpoint names, the results object a probing run returns, and reading a finished
run's settings back."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from forethought.analyses.experiment import ExperimentResults
from forethought.analyses.plots import METRIC_TITLES, PALETTE, facet_labels_as_values, measured_layers
from forethought.analyses.results import CONTROL, read_results
from forethought.core.errors import ForethoughtError
from forethought.core.files import read_json
from forethought.core.precision import check_precision
from forethought.core.settings import UNBOUND, check_settings, typed_settings
from forethought.probes.future import FutureProbeConfig
from forethought.probes.metrics import POOLED

LOGIT_LENS = "logit lens"
LENS_TAUS = [1]  # the logit lens reads the model's own next-token prediction
BASELINE = "baseline"  # the checkpoint column of the count baselines' rows
SKIP_BIGRAM = "skip-bigram"
UNIGRAM = "unigram"  # the class prior: its top-1 always names the majority class
AT_PRIOR = "at the prior"  # the flag of a probe that beats the unigram neither in top-1 nor in cross-entropy
PROBE_COLUMNS = ("flag",)  # a probing table's own column: AT_PRIOR or "" on each probe row (None elsewhere)
VALIDATION = "validation"  # the split column of fitted probes' scores on their validation sequences
TOPK_KINDS = ("topk", "mlp")  # probe kinds predicting the K most frequent tokens + "other"


def check_top_k(top_k: int, vocab_size: int) -> None:
    """Refuse top-K classes that take the whole vocabulary: "other" would stay empty (a user asking for more classes
    than there are tokens meant something else)."""
    if top_k >= vocab_size:
        raise ForethoughtError(f"top_k {top_k} reaches the vocabulary's {vocab_size} tokens, which leaves the class "
                               f"'other' empty: choose a top_k below {vocab_size}")


@dataclass
class ProbeSettings:
    """What is probed and how: held-out data, the (layer, τ) grid, the probe kind and its training. The settings
    of :class:`analyses.compare.Comparison`; a probing experiment's config adds its checkpoints (a
    ``named_checkpoints()`` method), ``out`` and ``figures_dir``."""

    corpus: str | None = None  # held-out text from another corpus (default: the checkpoints' own test documents)
    layout: str = "first"  # with `corpus`: 'first' or 'packed'
    seq_len: int = 64  # with `corpus`: sequence length
    prepend_bos: bool = False  # start every held-out sequence with the tokenizer's BOS token (counted in `seq_len`)
    tokens_root: str = "runs/tokens"  # token files are written (once) under here
    max_sequences: int = 2000  # held-out sequences cached and probed (split again for the probes)
    layers: tuple[int, ...] | None = None  # residual layers 0 … L to probe (default: all)
    taus: tuple[int, ...] = (1, 2, 3, 4)  # offsets τ ≥ 1 (τ = 1: the next token)
    kind: str = "softmax"  # softmax, topk, lens, or mlp (topk's classes through one hidden layer: not linear)
    top_k: int = 1000  # topk, mlp: the K most frequent tokens + "other"
    hidden: int = 256  # mlp: the hidden layer's width
    nonlinear: bool = False  # also fit mlp probes (--kind topk's classes, one hidden layer) and report mlp − topk
    lr: float = 3e-3  # Adam's learning rate (standardised features; bias starts at unigram log-frequencies)
    max_epochs: int = 20  # at most this many passes over the probes' training split
    patience: int = 2  # stop after this many epochs without a better validation loss
    batch_sequences: int = 64  # sequences per minibatch (cache writing and probe fitting)
    random_init: bool = True  # also probe a random-init model of the same architecture (the control)
    seed: int = 0  # probe split, probe training, random-init weights
    device: str = "auto"  # 'auto': CUDA when available
    precision: str = "float32"  # float32 or bfloat16 (forwards and probes autocast; ~3× / ~10× faster on AMX CPUs)
    progress: bool = True  # show progress bars

    def __post_init__(self):
        check_settings(self)
        FutureProbeConfig(kind=self.kind)  # validates the kind
        if self.nonlinear and self.kind != "topk":
            raise ForethoughtError("`nonlinear` fits mlp probes beside topk probes of their classes: add `kind` topk")
        check_precision(self.precision)
        if self.layers is not None and not self.layers:
            raise ForethoughtError("layers must name at least one residual layer (or be None: all)")

    def tau_list(self) -> list[int]:
        """The offsets probed, ascending."""
        return sorted(set(self.taus))

    def layer_list(self, n_layers: int) -> list[int]:
        """The residual layers probed in a model of ``n_layers`` blocks (0 … n_layers), ascending."""
        layers = list(range(n_layers + 1)) if self.layers is None else sorted(set(self.layers))
        bad = [layer for layer in layers if not 0 <= layer <= n_layers]
        if bad:
            raise ForethoughtError(f"layers {bad} out of range: the checkpoints have residual layers 0 … {n_layers}")
        return layers

    def probe_config(self, device: str, kind: str | None = None) -> FutureProbeConfig:
        """How the probes of ``kind`` (default: :attr:`kind`) are fitted."""
        return FutureProbeConfig(kind=kind or self.kind, top_k=self.top_k, hidden=self.hidden, lr=self.lr,
                                 max_epochs=self.max_epochs, patience=self.patience,
                                 batch_sequences=self.batch_sequences, seed=self.seed, device=device,
                                 precision=self.precision)

    def lens_config(self, device: str) -> FutureProbeConfig:
        """The logit lens: the untrained lens probe of τ = 1 (:data:`LENS_TAUS`), scored on the probes' held-out
        positions (their horizon, max τ) and, beside topk probes, in their classes (K tokens + "other")."""
        return replace(self.probe_config(device, "lens"), max_epochs=0, horizon=max(self.tau_list()),
                       in_topk_classes=self.kind in TOPK_KINDS)

    def target(self, kind: str | None = None) -> str:
        """What a probe of ``kind`` predicts (the results table's ``target``)."""
        if (kind or self.kind) in TOPK_KINDS or (kind == "lens" and self.kind in TOPK_KINDS):
            return f"token x[t+τ] if among the {self.top_k} most frequent, else other"
        return "token x[t+τ]"


def best_by_tau(rows: pd.DataFrame, metric: str) -> dict[int, int]:
    """{τ: the layer of the best ``metric``} among one checkpoint's probe rows (higher top-1 / top-5, lower
    cross-entropy)."""
    rows = rows[rows["metric"] == metric]
    best = rows.loc[(rows["value"] if metric != "cross_entropy" else -rows["value"]).groupby(rows["tau"]).idxmax()]
    return {int(tau): int(layer) for tau, layer in zip(best["tau"], best["layer"])}


def check_names(names: Iterable[str]) -> None:
    """Refuse a checkpoint name that cannot name a folder, is reserved, or comes twice."""
    taken: list[str] = []
    for name in names:
        taken.append(check_name(name, taken))


def check_name(name: str, taken: Iterable[str]) -> str:
    """``name`` if no other checkpoint has it (nor the control or the baselines)."""
    if not name.strip() or name.strip(".") == "":
        raise ForethoughtError(f"checkpoint name {name!r} cannot name a folder; name it NAME=PATH")
    if name in (CONTROL, BASELINE):
        raise ForethoughtError(
            f"the name {name!r} is kept for the {'control' if name == CONTROL else 'count baselines'}"
            "; name the checkpoint otherwise"
        )
    if name in taken:
        raise ForethoughtError(f"two checkpoints are named {name!r}; name them NAME=PATH")
    return name


@dataclass
class ProbingResults(ExperimentResults):
    """Held-out metrics of every (checkpoint, layer, τ) probe, the control and the count baselines: what a probing
    experiment's results (``probe``, ``precache``) share. Their config is a :class:`ProbeSettings` with
    ``named_checkpoints()``."""

    DERIVED: ClassVar[tuple[str, ...]] = ()  # rows computed from other checkpoints' (left out of accuracy plots)

    def _probed(self, metric: str, probe: str | None = None, split: str = POOLED) -> pd.DataFrame:
        """Rows of the fitted probes (or of ``probe``, e.g. the logit lens) for ``metric``, per checkpoint, on the
        test examples (or ``split="validation"``)."""
        table = self.table
        return table[(table["metric"] == metric) & (table["probe"] == (probe or self.config.kind))
                     & (table["split"] == split) & table["layer"].notna() & ~table["checkpoint"].isin(self.DERIVED)]

    def to_dataframe(self) -> pd.DataFrame:
        """The tidy table (DESIGN.md's columns)."""
        return self.table

    def beyond_counts(self, checkpoint: str | None = None, metric: str = "top1",
                      baseline: str = SKIP_BIGRAM) -> pd.DataFrame:
        """Probe − ``baseline`` (skip-bigram or unigram) for ``metric`` (paired, same examples) of ``checkpoint``
        (default: the first): (layer, τ) rows with value, ci_low, ci_high — where the residual stream holds more about
        x[t+τ] than the token x[t] does through the counts (than the class prior, for the unigram)."""
        rows = self.table[
            (self.table["probe"] == f"{self.config.kind} − {baseline}") & (self.table["metric"] == metric)
        ]
        rows = rows[rows["checkpoint"] == (checkpoint or rows["checkpoint"].iloc[0])]
        return rows.set_index(["layer", "tau"])[["value", "ci_low", "ci_high", "n"]]

    def baseline_values(self, tau: int, metric: str = "top1") -> dict[str, tuple[float, int | None]]:
        """{baseline: (its ``metric`` at ``tau``, its layer)}: the unigram and the skip-bigram (no layer) and, at
        τ = 1, the logit lens at its best layer — what a probe has to beat to show something the counts or the
        model's own output do not already give."""
        table, found = self.table, {}
        counts = table[(table["checkpoint"] == BASELINE) & (table["metric"] == metric) & (table["tau"] == tau)
                       & (table["target"] == self.config.target())]
        for _, row in counts.iterrows():
            found[row["probe"]] = (float(row["value"]), None)
        lens = self._probed(metric, probe=LOGIT_LENS)
        lens = lens[lens["tau"] == tau]
        if len(lens):
            best = lens.loc[(lens["value"] if metric != "cross_entropy" else -lens["value"]).idxmax()]
            found[LOGIT_LENS] = (float(best["value"]), int(best["layer"]))
        return found

    def best_layers(self, checkpoint: str, metric: str = "top1") -> dict[int, int]:
        """{τ: the layer whose probe scores best on ``metric``} for ``checkpoint``, chosen on the probes' validation
        sequences — never on the test examples, so the chosen layer's test score is an unbiased estimate."""
        rows = self._probed(metric, split=VALIDATION)
        if rows.empty:
            raise ForethoughtError(f"{self.config.out} holds no validation scores to choose a best layer on (a run "
                                   "of an older workbench); run its command again")
        return best_by_tau(rows[rows["checkpoint"] == checkpoint], metric)

    def reading(self, checkpoint: str | None = None, metric: str = "top1") -> str:
        """The plain reading, per τ: the best layer's probe (chosen on validation) on the test examples beside the
        strongest baseline (the best of unigram, skip-bigram and, at τ = 1, the logit lens), with the paired 95 %
        interval where that baseline is a count; the layers whose probe beats both counts (paired intervals wholly on
        the better side of 0: higher top-1 / top-5, lower cross-entropy); and the layers flagged at the prior."""
        checkpoint = checkpoint or next(iter(self.config.named_checkpoints()))
        sign = -1 if metric == "cross_entropy" else 1  # +1: higher is better
        best = self.best_layers(checkpoint, metric)
        beyond = {name: self.beyond_counts(checkpoint, metric, name) for name in (SKIP_BIGRAM, UNIGRAM)}
        beyond = {name: rows for name, rows in beyond.items() if len(rows)}  # runs before the unigram rows: one
        probed = self._probed(metric)
        probed = probed[probed["checkpoint"] == checkpoint].set_index(["layer", "tau"])
        layers = sorted({int(layer) for layer, _ in probed.index})
        lines = [f"{checkpoint}: held-out {metric} of the probe at its best layer (chosen on the validation "
                 "sequences) beside the strongest baseline, paired 95% CI against a count baseline:"]
        for tau in sorted(best):
            layer = best[tau]
            value = float(probed.loc[(layer, tau), "value"])
            baselines = self.baseline_values(tau, metric)
            name, (strongest, lens_layer) = max(baselines.items(), key=lambda item: sign * item[1][0])
            where = f" at layer {lens_layer}" if lens_layer is not None else ""
            side = "above" if sign * (value - strongest) > 0 else "below"
            interval = ""
            if name in beyond and (layer, tau) in beyond[name].index:
                row = beyond[name].loc[(layer, tau)]
                side = ("above" if sign * row["ci_low"] > 0 and sign * row["ci_high"] > 0 else
                        "below" if sign * row["ci_low"] < 0 and sign * row["ci_high"] < 0 else "not separable from")
                interval = f" ({row['value']:+.3f}, {row['ci_low']:+.3f} – {row['ci_high']:+.3f})"
            better = [lay for lay in layers if all(
                (lay, tau) in rows.index and min(sign * rows.loc[(lay, tau), "ci_low"],
                                                 sign * rows.loc[(lay, tau), "ci_high"]) > 0
                for rows in beyond.values())]
            flagged = ([int(lay) for (lay, t), flag in probed["flag"].items() if t == tau and flag == AT_PRIOR]
                       if "flag" in probed else [])
            lines.append(f"  τ = {tau}: best layer {layer}: {value:.3f}, {side} the strongest baseline, {name}{where} "
                         f"{strongest:.3f}{interval}; better than "
                         f"{' and '.join(beyond) or 'the counts'} at "
                         + (f"layer{'s' * (len(better) > 1)} {span_text(better)}" if better else "no layer")
                         + (f"; at the prior (no better than the majority class) at layer{'s' * (len(flagged) > 1)} "
                            f"{span_text(sorted(flagged))}" if flagged else ""))
        return "\n".join(lines)

    def accuracy(self, metric: str = "top1") -> pd.DataFrame:
        """``metric`` by (checkpoint, τ) rows × layer columns."""
        return self._probed(metric).pivot_table(
            index=["checkpoint", "tau"], columns="layer", values="value", sort=False
        )

    def figure(self, metric: str = "top1") -> go.Figure:
        """``metric`` by layer, one line per τ, one panel per checkpoint; skip-bigram baselines dashed, the
        logit lens (τ = 1) dotted."""
        rows = self._probed(metric).assign(
            tau=lambda t: "τ = " + t["tau"].astype(str),
            plus=lambda t: t["ci_high"] - t["value"], minus=lambda t: t["value"] - t["ci_low"])
        figure = px.line(rows, x="layer", y="value", color="tau", facet_col="checkpoint", markers=True,
                         error_y="plus", error_y_minus="minus", color_discrete_sequence=PALETTE,
                         labels={"layer": "residual layer l", "value": METRIC_TITLES[metric]},
                         title=f"Future-token probes ({self.config.kind}): held-out {metric} of x[t+τ] from h[l, t], "
                               "95% CI; dashed: skip-bigram, dash-dot: unigram (the prior), dotted: logit lens "
                               "(τ = 1); ✕: at the prior")
        colors = {trace.name: trace.line.color for trace in figure.data}
        lens = self._probed(metric, probe=LOGIT_LENS)
        for column, name in enumerate(dict.fromkeys(rows["checkpoint"]), start=1):
            mine = lens[lens["checkpoint"] == name].sort_values("layer")
            figure.add_scatter(x=mine["layer"].astype(int), y=mine["value"], mode="lines", name="logit lens (τ = 1)",
                               line=dict(dash="dot", color=colors.get("τ = 1", "gray")), showlegend=column == 1,
                               row=1, col=column)
        table = self.table
        baselines = table[table["probe"].isin([SKIP_BIGRAM, UNIGRAM]) & (table["metric"] == metric)
                          & (table["checkpoint"] == BASELINE) & (table["target"] == self.config.target())]
        for _, row in baselines.iterrows():
            figure.add_hline(y=row["value"], line_dash="dash" if row["probe"] == SKIP_BIGRAM else "dashdot",
                             line_color=colors.get(f"τ = {row['tau']}", "gray"), row="all", col="all")
        if "flag" in rows:  # probes no better than the class prior, marked where they sit
            for column, name in enumerate(dict.fromkeys(rows["checkpoint"]), start=1):
                flagged = rows[(rows["checkpoint"] == name) & (rows["flag"] == AT_PRIOR)]
                figure.add_scatter(x=flagged["layer"].astype(int), y=flagged["value"], mode="markers",
                                   marker=dict(symbol="x", size=11, color="black"), showlegend=column == 1,
                                   name="at the prior (no better than the majority class)", row=1, col=column)
        facet_labels_as_values(figure)
        return measured_layers(figure, rows["layer"])

    def figures(self) -> dict[str, go.Figure]:
        return {f"probe_{self.config.kind}_{metric}": self.figure(metric) for metric in ("top1", "top5")}

    def summary(self) -> str:
        table = self.accuracy()
        lines = ["held-out top-1 of x[t+τ] by layer:", table.to_string(float_format=lambda v: f"{v:.3f}")]
        lens = self._probed("top1", probe=LOGIT_LENS).pivot(index="checkpoint", columns="layer", values="value")
        lines += ["logit lens (τ = 1), top-1 by layer:", lens.to_string(float_format=lambda v: f"{v:.3f}")]
        baselines = self.table[(self.table["checkpoint"] == BASELINE) & (self.table["metric"] == "top1")]
        for _, row in baselines.iterrows():
            lines.append(f"  {row['probe']:<12} τ = {row['tau']}: {row['value']:.3f}")
        if (self.table["probe"] == f"{self.config.kind} − {SKIP_BIGRAM}").any():  # runs made before it: none
            lines.append(self.reading())
        return "\n".join(lines)


def span_text(layers: list[int]) -> str:
    """``[3, 4, 5, 9]`` → ``"3–5, 9"`` (runs of consecutive layers); ``[]`` → ``""``."""
    runs, start = [], layers[0] if layers else None
    for previous, layer in zip(layers, [*layers[1:], None]):
        if layer != previous + 1:
            runs.append(f"{start}" if start == previous else f"{start}–{previous}")
            start = layer
    return ", ".join(runs)


SINCE_ADDED = {"hidden": 256, "nonlinear": False}  # settings added after runs were made: what their absence meant


def saved_probing_run(out: str | Path) -> tuple[ProbeSettings, dict[str, str]]:
    """The settings (``config.json``) and the named checkpoints (``meta.json``: as loaded, the control left out)
    of a finished probing run in ``out``, whichever command made it."""
    out = Path(out)
    if not (out / "config.json").is_file():
        raise ForethoughtError(f"{out} holds no probe or precache run (no config.json)")
    saved = read_json(out / "config.json", f"run the probe or precache command into {out} again")
    needed = [f.name for f in fields(ProbeSettings) if f.name not in UNBOUND]
    if isinstance(saved, dict):
        saved = {**SINCE_ADDED, **saved}
    if not isinstance(saved, dict) or set(needed) - set(saved):
        raise ForethoughtError(f"{out} holds no probe or precache run (its config.json has other settings)")
    if not (out / "meta.json").is_file():
        raise ForethoughtError(
            f"{out} holds no finished probe or precache run (no meta.json); finish it with its command"
        )
    _, meta = read_results(out)
    checkpoints = {name: source for name, source in meta.get("checkpoints", {}).items() if name != CONTROL}
    if not checkpoints:
        raise ForethoughtError(f"{out}/meta.json names no checkpoints; run the probe or precache command again")
    return ProbeSettings(**typed_settings(ProbeSettings, {name: saved[name] for name in needed})), checkpoints
