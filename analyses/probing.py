"""Probing named checkpoints on held-out text: the plumbing that ``forethought probe``, ``precache`` and
:class:`analyses.compare.Comparison` share.

The settings (:class:`ProbeSettings`), naming and loading the checkpoints, the random-init control, caching each
checkpoint's residual streams (:mod:`probes.cache`), the probe grid's stored scores (:mod:`probes.store`), the logit
lens and the count baselines (:mod:`probes.baselines`) as tidy rows, and the results object a probing run returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from analyses.experiment import ExperimentResults, prepare_out
from analyses.plots import PALETTE, facet_labels_as_values
from analyses.results import CONTROL, read_results, run_meta
from models.errors import ForethoughtError
from models.families import n_layers
from models.files import check_free_space, read_json, staged_folder
from models.gpt2 import build_lm
from models.heldout import heldout_data
from models.lm import LMCheckpoint, check_same_tokenizer
from models.precision import check_precision
from models.settings import UNBOUND, as_text, check_settings, typed_settings
from models.tasks.text import TextData, tokenization
from models.train import resolve_device
from probes.baselines import count_baselines
from probes.cache import PROCESSING_MODE, ResidualCache, build_cache
from probes.future import FutureProbeConfig, ProbeScores
from probes.split import ProbeSplit
from probes.store import probe_scores

LOGIT_LENS = "logit lens"
LENS_TAUS = [1]  # the logit lens reads the model's own next-token prediction
BASELINE = "baseline"  # the checkpoint column of the count baselines' rows
SKIP_BIGRAM = "skip-bigram"


@dataclass
class ProbeSettings:
    """What is probed and how: held-out data, the (layer, τ) grid, the probe kind and its training. The settings
    of :class:`analyses.compare.Comparison`; a probing experiment's config adds its checkpoints (a
    ``named_checkpoints()`` method), ``out`` and ``figures_dir``."""

    corpus: str | None = None  # held-out text from another corpus (default: the checkpoints' own test documents)
    layout: str = "first"  # with corpus: 'first' or 'packed'
    seq_len: int = 64  # with corpus: sequence length
    prepend_bos: bool = False  # start every held-out sequence with the tokenizer's BOS token (counted in seq_len)
    tokens_root: str = "runs/tokens"
    max_sequences: int = 2000  # held-out sequences cached and probed (split again for the probes)
    layers: tuple[int, ...] | None = None  # residual layers 0 … L (None, on the command line 'all': every one)
    taus: tuple[int, ...] = (1, 2, 3, 4)  # offsets τ ≥ 1 (τ = 1: the next token)
    kind: str = "softmax"  # softmax, topk or lens
    top_k: int = 1000  # topk: the K most frequent tokens + "other"
    lr: float = 3e-3  # Adam (on standardised features, the bias starting at the unigram log-frequencies)
    max_epochs: int = 20
    patience: int = 2
    batch_sequences: int = 64  # sequences per minibatch (cache writing and probe fitting)
    random_init: bool = True  # also probe a random-init model of the same architecture (the control)
    seed: int = 0  # probe split, probe training, random-init weights
    device: str = "auto"  # 'auto': CUDA when available
    precision: str = "float32"  # or bfloat16: forwards and probes under autocast (~3× / ~10× faster on AMX CPUs)
    progress: bool = True

    def __post_init__(self):
        check_settings(self)
        FutureProbeConfig(kind=self.kind)  # validates the kind
        check_precision(self.precision)
        if not self.taus or min(self.taus) < 1:
            raise ForethoughtError(f"taus must be offsets ≥ 1, got {as_text(self.taus) or 'none'}")
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
        return FutureProbeConfig(kind=kind or self.kind, top_k=self.top_k, lr=self.lr, max_epochs=self.max_epochs,
                                 patience=self.patience, batch_sequences=self.batch_sequences, seed=self.seed,
                                 device=device, precision=self.precision)

    def lens_config(self, device: str) -> FutureProbeConfig:
        """The logit lens: the untrained lens probe of τ = 1 (:data:`LENS_TAUS`), scored on the probes' held-out
        positions (their horizon, max τ) and, beside topk probes, in their classes (K tokens + "other")."""
        return replace(self.probe_config(device, "lens"), max_epochs=0, horizon=max(self.tau_list()),
                       in_topk_classes=self.kind == "topk")

    def target(self, kind: str | None = None) -> str:
        """What a probe of ``kind`` predicts (the results table's ``target``)."""
        if (kind or self.kind) == "topk" or (kind == "lens" and self.kind == "topk"):
            return f"token x[t+τ] if among the {self.top_k} most frequent, else other"
        return "token x[t+τ]"


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

    def _probed(self, metric: str, probe: str | None = None) -> pd.DataFrame:
        """Rows of the fitted probes (or of ``probe``, e.g. the logit lens) for ``metric``, per checkpoint."""
        table = self.table
        return table[(table["metric"] == metric) & (table["probe"] == (probe or self.config.kind))
                     & table["layer"].notna() & ~table["checkpoint"].isin(self.DERIVED)]

    def to_dataframe(self) -> pd.DataFrame:
        """The tidy table (DESIGN.md's columns)."""
        return self.table

    def beyond_counts(self, checkpoint: str | None = None, metric: str = "top1") -> pd.DataFrame:
        """Probe − skip-bigram baseline for ``metric`` (paired, same examples) of ``checkpoint`` (default: the
        first): (layer, τ) rows with value, ci_low, ci_high — where the residual stream holds more about x[t+τ]
        than the token x[t] does through the counts."""
        rows = self.table[
            (self.table["probe"] == f"{self.config.kind} − {SKIP_BIGRAM}") & (self.table["metric"] == metric)
        ]
        rows = rows[rows["checkpoint"] == (checkpoint or rows["checkpoint"].iloc[0])]
        return rows.set_index(["layer", "tau"])[["value", "ci_low", "ci_high", "n"]]

    def reading(self, checkpoint: str | None = None, metric: str = "top1") -> str:
        """The plain reading: per τ, the best layer's probe minus the skip-bigram with its paired 95 % interval,
        and the layers whose interval lies wholly on the better side of 0 (higher top-1 / top-5, lower
        cross-entropy). The best layer is picked on these same held-out examples."""
        checkpoint = checkpoint or next(iter(self.config.named_checkpoints()))
        sign = -1 if metric == "cross_entropy" else 1  # +1: higher is better
        beyond = self.beyond_counts(checkpoint, metric)
        lines = [f"{checkpoint}: {metric} of the probe minus the skip-bigram (paired 95% CI):"]
        for tau, rows in beyond.groupby(level="tau"):
            best = (sign * rows["value"]).idxmax()
            better = [int(layer) for (layer, _), row in rows.iterrows()
                      if min(sign * row["ci_low"], sign * row["ci_high"]) > 0]
            row = rows.loc[best]
            lines.append(f"  τ = {tau}: best layer {int(best[0])}: {row['value']:+.3f} ({row['ci_low']:+.3f} – "
                         f"{row['ci_high']:+.3f}); better than the counts at "
                         + (f"layer{'s' * (len(better) > 1)} {span_text(better)}" if better else "no layer"))
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
        facet_labels_as_values(figure)
        figure.update_xaxes(dtick=1)
        return figure

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



def load_checkpoints(named: dict[str, str]) -> dict[str, LMCheckpoint]:
    """Load every named checkpoint (one that cannot be loaded is named with the reason); they must share a
    tokenizer, to be probed on the same tokens."""
    checkpoints = {name: load_checkpoint(name, source) for name, source in named.items()}
    check_same_tokenizer(checkpoints)
    return checkpoints


def load_checkpoint(name: str, source: str | Path) -> LMCheckpoint:
    try:
        return LMCheckpoint.load(source)
    except (ForethoughtError, OSError, ValueError) as error:
        raise ForethoughtError(f"checkpoint {name!r} ({source}) cannot be loaded: {error}") from None


def heldout_tokens(checkpoints: dict[str, LMCheckpoint], settings: ProbeSettings) -> tuple[TextData, np.ndarray]:
    """The held-out data and its first ``max_sequences`` test sequences [n, seq] (the tokens probed)."""
    data = heldout_data(checkpoints, settings.corpus, settings.layout, settings.seq_len, settings.prepend_bos)
    first = next(iter(checkpoints.values()))
    return data, data.load(first.tokenizer, settings.tokens_root)["test"][: settings.max_sequences]


def control_checkpoint(like: LMCheckpoint, seed: int, folder: Path) -> LMCheckpoint:
    """A random-init model of ``like``'s architecture, any family (saved in ``folder/random-init``, so it can be
    cached)."""
    model = build_lm(like.model.config, seed=seed)
    check_free_space(folder, sum(t.numel() * t.element_size() for t in model.state_dict().values()) + 2**24,
                     "the random-init control")
    with staged_folder(folder / "random-init") as staging:
        model.save_pretrained(staging)
        like.tokenizer.save_pretrained(staging)
    return LMCheckpoint.load(folder / "random-init")


def residual_cache(name: str, checkpoint: LMCheckpoint, tokens: np.ndarray, layers: list[int],
                   settings: ProbeSettings, folder: Path, device: str) -> ResidualCache:
    """``checkpoint``'s residuals over ``tokens``, cached in ``folder/caches/<name>`` (reused when there)."""
    return build_cache(checkpoint.source, tokens, folder / "caches" / name.replace("/", "_"), layers,
                       settings.batch_sequences, device, settings.progress, settings.precision)


def score_rows(scores: ProbeScores, checkpoint: str, target: str, probe: str | None = None) -> pd.DataFrame:
    """Tidy rows of ``scores`` (named ``probe``, e.g. :data:`LOGIT_LENS`, instead of the scores' kind)."""
    table = scores.table().assign(checkpoint=checkpoint, target=target)
    return table if probe is None else table.assign(probe=probe)


def counted_sequences(checkpoints: dict[str, LMCheckpoint], settings: ProbeSettings) -> np.ndarray | None:
    """The checkpoints' own training sequences [m, T] where the held-out text is their data (the count baselines
    then know what the models saw); None for another corpus (the baselines count the probes' training split)."""
    if settings.corpus is not None:
        return None
    data = heldout_data(checkpoints, None, settings.layout, settings.seq_len, settings.prepend_bos)
    return data.load(next(iter(checkpoints.values())).tokenizer, settings.tokens_root)["train"]


def baseline_rows(tokens: np.ndarray, split: ProbeSplit, settings: ProbeSettings, kind: str, vocab_size: int,
                  counted: np.ndarray | None = None) -> pd.DataFrame:
    """Tidy rows of the unigram and skip-bigram baselines on the held-out examples of ``split`` (the probes' of
    ``kind``), over its classes, counted on ``counted`` (:func:`counted_sequences`) or else its training part."""
    return count_baselines(tokens, split.train, split.test, settings.tau_list(), vocab_size, classes=split.classes,
                           counted=counted).table().assign(checkpoint=BASELINE, target=settings.target(kind))


@dataclass
class ProbeRun:
    """What probing a set of checkpoints produced, before it is written: rows, and per-example scores."""

    data: TextData
    tokens: np.ndarray  # [n, seq] the held-out sequences probed
    rows: list[dict[str, Any]]
    scores: dict[str, ProbeScores]  # per checkpoint (and the control)
    sources: dict[str, str]
    tokenization: dict[str, Any]  # tokenizer, BOS policy and how the text was cut (checked equal for all)
    baselines_counted_on: str  # which tokens the count baselines count
    origins: dict[str, dict[str, Any]]  # converted models' cards (where a model came from, licence)
    split: ProbeSplit  # the probes', the lens' and the baselines' sequences, and the classes they predict


def counted_on(counted: np.ndarray | None, split: ProbeSplit) -> str:
    """What the count baselines counted, in words (``meta.json``)."""
    if counted is not None:
        return f"the models' {counted.size:,} training tokens ({len(counted):,} sequences)"
    return f"the probes' training split of the held-out text ({len(split.train):,} sequences)"


def probe_checkpoints(config: ProbeSettings, checkpoints: dict[str, LMCheckpoint], out: str | Path) -> ProbeRun:
    """Cache and probe ``checkpoints`` (and the control) on held-out text into the run folder ``out``; add the
    logit lens and the baselines. The held-out data, layers and τ are checked before the folder is written."""
    first = next(iter(checkpoints.values()))
    data, tokens = heldout_tokens(checkpoints, config)
    layers = config.layer_list(n_layers(first.model.config))
    if max(config.tau_list()) >= tokens.shape[1]:
        raise ForethoughtError(f"taus reach {max(config.tau_list())}, but the held-out sequences have "
                               f"{tokens.shape[1]} tokens: τ must stay below that")
    out = prepare_out(out, config)
    device = str(resolve_device(config.device))
    if config.random_init:
        checkpoints = {**checkpoints, CONTROL: control_checkpoint(first, config.seed, out)}
    split = config.probe_config(device).split(tokens)  # the probes', the lens' and the baselines' examples
    frames, scores, lenses = [], {}, {}
    for name, checkpoint in checkpoints.items():
        cache = residual_cache(name, checkpoint, tokens, layers, config, out, device)
        store = out / "scores" / name.replace("/", "_")
        scores[name] = probe_scores(cache, checkpoint.model, config.tau_list(), config.probe_config(device), store,
                                    config.progress, split)
        lens = probe_scores(cache, checkpoint.model, LENS_TAUS, config.lens_config(device), store, config.progress,
                            split)
        frames += [score_rows(scores[name], name, config.target()),
                   score_rows(lens, name, config.target("lens"), probe=LOGIT_LENS)]
        lenses[name] = lens
    counted = counted_sequences(checkpoints, config)
    baselines = count_baselines(tokens, split.train, split.test, config.tau_list(), first.model.config.vocab_size,
                                classes=split.classes, counted=counted)
    frames.append(baselines.table().assign(checkpoint=BASELINE, target=config.target()))
    frames += [scores[name].minus_baseline(baselines, SKIP_BIGRAM).assign(checkpoint=name, target=config.target())
               for name in checkpoints]  # beyond the counts: paired probe − skip-bigram per (layer, τ)
    frames += [lenses[name].minus_baseline(baselines, SKIP_BIGRAM).assign(  # the lens predicts the probes' classes
        checkpoint=name, target=config.target("lens"), probe=f"{LOGIT_LENS} − {SKIP_BIGRAM}") for name in checkpoints]
    rows = pd.concat(frames, ignore_index=True).to_dict("records")
    return ProbeRun(data, tokens, rows, scores, {name: c.source for name, c in checkpoints.items()},
                    tokenization(first.tokenizer, data), counted_on(counted, split),
                    {name: c.origin for name, c in checkpoints.items() if c.origin}, split)


def probe_meta(run: ProbeRun) -> dict[str, Any]:
    """Provenance of a probing run for ``meta.json``."""
    return run_meta(data=asdict(run.data), heldout=f"first {len(run.tokens)} sequences of the test documents",
                    checkpoints=run.sources, models=run.origins, tokenization=run.tokenization,
                    baselines_counted_on=run.baselines_counted_on, probe_split=split_record(run.split),
                    processing_mode=PROCESSING_MODE)


def split_record(split: ProbeSplit) -> dict[str, Any]:
    """The probe split in ``meta.json``: each part's sequence ids (into the held-out sequences probed) and the
    top-K classes' token ids (None: every token is a class)."""
    return {"train": split.train.tolist(), "validation": split.validation.tolist(), "test": split.test.tolist(),
            "classes": None if split.classes is None else split.classes.tolist()}


def saved_probing_run(out: str | Path) -> tuple[ProbeSettings, dict[str, str]]:
    """The settings (``config.json``) and the named checkpoints (``meta.json``: as loaded, the control left out)
    of a finished probing run in ``out``, whichever command made it."""
    out = Path(out)
    if not (out / "config.json").is_file():
        raise ForethoughtError(f"{out} holds no probe or precache run (no config.json)")
    saved = read_json(out / "config.json", f"run the probe or precache command into {out} again")
    needed = [f.name for f in fields(ProbeSettings) if f.name not in UNBOUND]
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
