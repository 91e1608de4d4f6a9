"""Compare checkpoints interactively: one object that probes them lazily and draws the comparison.

    comparison = Comparison.from_checkpoints({"vanilla": "runs/lm-cpu-s0-vanilla", "myopic": "runs/lm-cpu-s0-myopic"})
    comparison.figure()                      # probe accuracy by layer; menus for probe kind, metric and τ
    comparison.heatmap("vanilla", "myopic")  # layer × τ paired differences with confidence marks
    comparison.to_dataframe()                # the tidy table (DESIGN.md's columns)

Nothing is computed until a result is asked for. Each checkpoint's residual streams are cached on disk and each
probe grid's per-example scores are stored beside them (the layout of ``forethought probe --out``, so a probe
run's folder is reused as it is); asking again, in this session or a later one, does no work.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import cycle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from analyses.plots import FDR_NOTE, PALETTE, difference_heatmap, save_figure
from analyses.probing import (
    BASELINE,
    LENS_TAUS,
    LOGIT_LENS,
    ProbeSettings,
    baseline_rows,
    check_name,
    check_names,
    control_checkpoint,
    counted_sequences,
    heldout_tokens,
    load_checkpoint,
    residual_cache,
    saved_probing_run,
    score_rows,
    span_text,
)
from analyses.results import CONTROL, tidy
from models.errors import ForethoughtError
from models.families import n_layers
from models.gpt2 import quiet_loading
from models.lm import LMCheckpoint, check_same_tokenizer
from models.settings import check_settings
from models.tasks.text import TextData, check_vocabulary, gpt2_tokenizer
from models.train import resolve_device
from probes.future import KINDS, METRICS, FutureProbeConfig, ProbeScores
from probes.split import ProbeSplit
from probes.store import probe_scores

CheckpointSource = str | Path | LMCheckpoint | PreTrainedModel  # folder, run folder, hub id, or in memory
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_BASELINE_COLORS = {"unigram": "#b0b0b0", "skip-bigram": "#404040"}


@dataclass
class CompareConfig:
    """Settings of ``forethought compare``: the comparison figure of a probe or precache run, as interactive HTML
    (menus and legend work in a browser) and PNG."""

    run: str = ""  # the --out folder of a `forethought probe` or `forethought precache` run
    add: dict[str, str] = field(default_factory=dict)  # more checkpoints to probe beside the run's: {name: source}
    figures_dir: str = "figures"  # writes compare_<kind>.html (and .png with Chromium) here
    progress: bool = True

    def __post_init__(self):
        check_settings(self)
        if not self.run:
            raise ForethoughtError("give --run: the --out folder of a forethought probe or precache run")


def run_compare(config: CompareConfig) -> Comparison:
    """Open the run, add the extra checkpoints, write the figure; return the comparison."""
    comparison = Comparison.from_folder(config.run, progress=config.progress)
    for name, source in config.add.items():
        comparison.add(name, source)
    save_figure(comparison.figure(), Path(config.figures_dir) / f"compare_{comparison.settings.kind}")
    return comparison


class Comparison:
    """Future-token probe results of named checkpoints on the same held-out sequences, computed when asked for.

    Build it with :meth:`from_checkpoints` (or :meth:`from_folder` for a ``forethought probe`` / ``precache``
    run). ``settings`` fix the held-out data and the (layer, τ) grid; the probe kind of each request may vary.
    """

    def __init__(self, checkpoints: Mapping[str, LMCheckpoint], settings: ProbeSettings, folder: str | Path):
        if not checkpoints:
            raise ForethoughtError("a comparison needs at least one checkpoint")
        self.settings, self.folder = settings, Path(folder)
        self._checkpoints: dict[str, LMCheckpoint] = {}
        for name, checkpoint in checkpoints.items():
            self._admit(name, checkpoint)
        self._device = str(resolve_device(settings.device))
        self._scores: dict[tuple[str, str], ProbeScores] = {}  # (checkpoint, probe kind or LOGIT_LENS)
        self._rows: dict[tuple[str, str], pd.DataFrame] = {}  # tidy rows of self._scores (bootstrapped once)
        self._baselines: dict[str, pd.DataFrame] = {}  # per target
        self._splits: dict[int | None, ProbeSplit] = {}  # per class set (top-K or every token)
        self._heldout: tuple[TextData, np.ndarray] | None = None  # (data, tokens [n, seq])

    @classmethod
    def from_checkpoints(
        cls,
        checkpoints: Mapping[str, CheckpointSource] | Sequence[CheckpointSource | tuple[str, CheckpointSource]],
        folder: str | Path = "runs/compare",
        tokenizer: PreTrainedTokenizerBase | None = None,
        **settings: Any,
    ) -> Comparison:
        """Named checkpoints — ``{name: source}``, or a list of sources (named after their folders) or
        ``(name, source)`` pairs — where a source is a checkpoint or run folder, a hub id, an
        :class:`~models.lm.LMCheckpoint` or a model in memory (saved under ``folder/models`` with ``tokenizer``,
        default: the GPT-2 tokenizer). ``settings``: fields of :class:`~analyses.probing.ProbeSettings`."""
        pairs = list(checkpoints.items()) if isinstance(checkpoints, Mapping) else [_pair(item) for item in checkpoints]
        folder = Path(folder)
        check_names(name for name, _ in pairs)
        known = [f.name for f in fields(ProbeSettings)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ForethoughtError(f"unknown settings {unknown}; the probe settings are {', '.join(known)}")
        loaded = {name: _load(name, source, folder, tokenizer) for name, source in pairs}
        return cls(loaded, ProbeSettings(**settings), folder)

    @classmethod
    @quiet_loading()
    def from_folder(cls, out: str | Path, **overrides: Any) -> Comparison:
        """The checkpoints, settings, caches and stored scores of a ``forethought probe`` or ``precache`` run."""
        settings, named = saved_probing_run(out)
        checkpoints = {name: load_checkpoint(name, source) for name, source in named.items()}
        return cls(checkpoints, replace(settings, **overrides), out)

    def add(self, name: str, source: CheckpointSource, tokenizer: PreTrainedTokenizerBase | None = None) -> Comparison:
        """Add a checkpoint; if it cannot be added the comparison is unchanged (and all it computed is kept)."""
        self._admit(check_name(name, self._checkpoints), _load(name, source, self.folder, tokenizer))
        return self

    def _admit(self, name: str, checkpoint: LMCheckpoint) -> None:
        """Check that ``checkpoint`` can be fed the same tokens and has the requested layers; then keep it."""
        if self._checkpoints:
            first_name, first = next(iter(self._checkpoints.items()))
            check_same_tokenizer({first_name: first, name: checkpoint})
        self.settings.layer_list(n_layers(checkpoint.model.config))
        self._checkpoints[name] = checkpoint

    # ---- what is compared, and what has been computed

    @property
    def names(self) -> list[str]:
        """The checkpoints, then the random-init control (if ``random_init``)."""
        return [
            *(name for name in self._checkpoints if name != CONTROL),
            *([CONTROL] if self.settings.random_init else []),
        ]

    @property
    def computed(self) -> dict[str, list[str]]:
        """{probe kind: checkpoints whose probes of that kind are computed}."""
        done: dict[str, list[str]] = {}
        for name, kind in self._scores:
            done.setdefault(kind, []).append(name)
        return done

    def layers(self, name: str) -> list[int]:
        """The residual layers probed in checkpoint ``name``."""
        return self.settings.layer_list(n_layers(self._checkpoint(name).model.config))

    @property
    def taus(self) -> list[int]:
        return self.settings.tau_list()

    @property
    def tokens(self) -> np.ndarray:
        """The held-out sequences every checkpoint is probed on [n, seq]."""
        if self._heldout is None:
            self._heldout = heldout_tokens(self._checkpoints, self.settings)
        return self._heldout[1]

    @quiet_loading()
    def _checkpoint(self, name: str) -> LMCheckpoint:
        if name == CONTROL and self.settings.random_init:
            if CONTROL not in self._checkpoints:  # made on first use, then kept with the others (listed last)
                first = next(iter(self._checkpoints.values()))
                self._checkpoints[CONTROL] = control_checkpoint(first, self.settings.seed, self.folder)
            return self._checkpoints[CONTROL]
        if name not in self._checkpoints or name == CONTROL:
            raise ForethoughtError(f"no checkpoint named {name!r}; this comparison holds {', '.join(self.names)}")
        return self._checkpoints[name]

    # ---- computing (lazily, once)

    @quiet_loading()
    def scores(self, name: str, kind: str | None = None) -> ProbeScores:
        """Per-example held-out scores of checkpoint ``name``'s (layer, τ) probes of ``kind`` (or the logit
        lens: ``kind="logit lens"``); fitted on first request, then read from memory or ``folder/scores``."""
        kind = self._kind(kind)
        if (name, kind) not in self._scores:
            checkpoint = self._checkpoint(name)
            cache = residual_cache(name, checkpoint, self.tokens, self.layers(name), self.settings, self.folder,
                                   self._device)
            config = (self.settings.lens_config(self._device) if kind == LOGIT_LENS
                      else self.settings.probe_config(self._device, kind))
            store = self.folder / "scores" / name.replace("/", "_")
            taus = LENS_TAUS if kind == LOGIT_LENS else self.taus
            self._scores[name, kind] = probe_scores(
                cache, checkpoint.model, taus, config, store, self.settings.progress, self._split(config)
            )
        return self._scores[name, kind]

    def _split(self, config: FutureProbeConfig) -> ProbeSplit:
        """The held-out split of probes fitted as ``config``, and their classes: one per class set, shared by every
        checkpoint's probes and the count baselines they are drawn beside."""
        key = config.top_k if config.in_topk else None
        if key not in self._splits:
            self._splits[key] = config.split(self.tokens)
        return self._splits[key]

    def compute(self, kinds: str | Sequence[str] | None = None) -> Comparison:
        """Probe every checkpoint with each of ``kinds`` (default: the settings' kind), and the logit lens."""
        for kind in self._kinds(kinds):
            missing = [name for name in self.names if {(name, kind), (name, LOGIT_LENS)} - self._scores.keys()]
            for name in tqdm(missing, desc=f"probing ({kind})", disable=not self.settings.progress or not missing):
                self.scores(name, kind)
                self.scores(name, LOGIT_LENS)
        return self

    def _kind(self, kind: str | None) -> str:
        kind = kind or self.settings.kind
        if kind not in (*KINDS, LOGIT_LENS):
            raise ForethoughtError(f"unknown probe kind {kind!r}; choose one of {', '.join((*KINDS, LOGIT_LENS))}")
        return kind

    def _kinds(self, kinds: str | Sequence[str] | None) -> list[str]:
        """``kinds`` as a list; None: the kinds computed so far, or the settings' kind."""
        if kinds is None:
            return [kind for kind in self.computed if kind != LOGIT_LENS] or [self.settings.kind]
        return [self._kind(kind) for kind in ([kinds] if isinstance(kinds, str) else kinds) if kind != LOGIT_LENS]

    # ---- results

    def to_dataframe(self, kinds: str | Sequence[str] | None = None) -> pd.DataFrame:
        """The tidy table (DESIGN.md's columns) of ``kinds`` (default: those computed, or the settings' kind):
        every checkpoint's probes, their logit lens (τ = 1) and the count baselines for those probes' classes."""
        kinds = self._kinds(kinds)
        self.compute(kinds)
        frames = []
        for kind in kinds:
            frames += [self._score_rows(name, kind) for name in self.names]
        frames += [self._score_rows(name, LOGIT_LENS) for name in self.names]
        vocab_size = self._checkpoint(self.names[0]).model.config.vocab_size
        lens_classes = "topk" if self.settings.kind == "topk" else "lens"  # the logit lens predicts the run's classes
        targets = {self.settings.target(kind): kind for kind in [lens_classes, *kinds]}  # one baseline per class set
        missing = {target: kind for target, kind in targets.items() if target not in self._baselines}
        counted = counted_sequences(self._checkpoints, self.settings) if missing else None  # loads the training data
        for target, kind in missing.items():
            split = self._split(self.settings.probe_config(self._device, kind))
            self._baselines[target] = baseline_rows(self.tokens, split, self.settings, kind, vocab_size, counted)
        frames += [self._baselines[target] for target in targets]
        task = f"text: {self._heldout[0].corpus}" if self._heldout else None
        return tidy(pd.concat(frames, ignore_index=True), task=task, seed=self.settings.seed)

    def _score_rows(self, name: str, kind: str) -> pd.DataFrame:
        """Tidy rows of :meth:`scores` (their bootstrap intervals are computed once)."""
        if (name, kind) not in self._rows:
            scores = self.scores(name, kind)
            self._rows[name, kind] = (score_rows(scores, name, self.settings.target("lens"), probe=LOGIT_LENS)
                                      if kind == LOGIT_LENS else score_rows(scores, name, self.settings.target(kind)))
        return self._rows[name, kind]

    def accuracy(self, kind: str | None = None, metric: str = "top1", layers: Sequence[int] | None = None,
                 taus: Sequence[int] | None = None) -> pd.DataFrame:
        """``metric`` of the probes of ``kind``: (checkpoint, τ) rows × layer columns."""
        kind = self._kind(kind)
        self._check_grid(self.names, layers, taus)
        table = self.to_dataframe(None if kind == LOGIT_LENS else kind)
        rows = table[(table["probe"] == kind) & (table["metric"] == _metric(metric))]
        rows = rows[rows["layer"].isin(layers or rows["layer"]) & rows["tau"].isin(taus or rows["tau"])]
        return rows.pivot_table(index=["checkpoint", "tau"], columns="layer", values="value", sort=False)

    def difference(self, a: str, b: str, kind: str | None = None) -> pd.DataFrame:
        """Paired differences a − b per (layer, τ, metric) on the same held-out examples, with 95 % bootstrap
        intervals resampling the same sequences for both (a = vanilla, b = myopic: the pre-caching estimate)."""
        kind = self._kind(kind)
        scores_a, scores_b = self.scores(a, kind), self.scores(b, kind)
        shared = scores_a.values.keys() & scores_b.values.keys()  # the layers both have (depths may differ)
        if not shared:
            raise ForethoughtError(f"{a!r} and {b!r} have no probed layer in common")
        restricted = [ProbeScores(s.kind, {key: s.values[key] for key in sorted(shared)}, s.sequence_ids)
                      for s in (scores_a, scores_b)]
        return restricted[0].minus(restricted[1]).assign(checkpoint=f"{a} − {b}")

    def heatmap(self, a: str, b: str, kind: str | None = None, metric: str = "top1",
                layers: Sequence[int] | None = None, taus: Sequence[int] | None = None) -> go.Figure:
        """Layer × τ heatmap of ``metric``(a) − ``metric``(b); cells not significant over the grid (Benjamini–
        Hochberg, 5 % false-discovery rate, from the paired 95 % intervals) are marked "n.s."."""
        self._check_grid([a, b], layers, taus)
        rows = self.difference(a, b, kind)
        rows = rows[(rows["metric"] == _metric(metric)) & rows["layer"].isin(layers or rows["layer"])
                    & rows["tau"].isin(taus or rows["tau"])]
        return difference_heatmap(rows, f"{metric}({a}) − {metric}({b}), {self._kind(kind)} probes, paired 95% CI; "
                                        + FDR_NOTE, colorbar="difference")

    def _check_grid(self, names: Sequence[str], layers: Sequence[int] | None, taus: Sequence[int] | None) -> None:
        """Refuse layers or τ outside what these checkpoints are probed at, saying what they are probed at."""
        missing_taus = sorted(set(taus or ()) - set(self.taus))
        if missing_taus:
            raise ForethoughtError(f"τ {missing_taus} not computed: this comparison probes τ "
                                   f"{', '.join(map(str, self.taus))} (set taus= when building it)")
        for name in names:
            missing = sorted(set(layers or ()) - set(self.layers(name)))
            if missing:
                raise ForethoughtError(f"layer {missing} not computed for {name!r}: it is probed at layers "
                                       f"{', '.join(map(str, self.layers(name)))}")

    def figure(
        self, kinds: str | Sequence[str] | None = None, metric: str = "top1", tau: int | None = None
    ) -> go.Figure:
        """Probe ``metric`` by layer, a line per checkpoint (toggled in the legend), the count baselines flat;
        menus choose the probe kind (``kinds`` and the logit lens), the metric, and τ (one, or all by dash)."""
        table = self.to_dataframe(kinds)
        views = [*self._kinds(kinds), LOGIT_LENS]
        tau = self.taus[0] if tau is None else tau
        self._check_grid([], None, [tau])
        metric = _metric(metric)
        # The menus act on different trace attributes — kind on `visible`, metric on the data (y and error bars),
        # τ on `opacity` (and hover) — so any combination of choices shows exactly the lines it names.
        colors = dict(zip(self._checkpoints, cycle(c for c in PALETTE if c != "#7F7F7F")))
        colors |= {CONTROL: "#7F7F7F", **_BASELINE_COLORS}
        figure = go.Figure()
        keys: list[tuple[str, int | None]] = []  # of trace i: (view, τ), τ None for a legend entry
        lines: list[dict[str, dict[str, list[float]]] | None] = []  # of trace i: {metric: y and error bars}
        for view in views:
            rows = self._view_rows(table, view)
            for name in dict.fromkeys(rows["checkpoint"]):  # one legend entry per line, whatever the τ
                figure.add_scatter(x=[None], y=[None], name=name, legendgroup=name,
                                   mode="lines" if name in _BASELINE_COLORS else "lines+markers",
                                   line=dict(color=colors[name]), visible=view == views[0])
                keys.append((view, None))
                lines.append(None)
            for (name, row_tau), line in rows.groupby(["checkpoint", "tau"], sort=False):
                lines.append(_columns(line))
                keys.append((view, row_tau))
                figure.add_scatter(
                    x=sorted(line["layer"].astype(int).unique()), y=lines[-1][metric]["value"], name=name,
                    legendgroup=name, showlegend=False, mode="lines" if name in _BASELINE_COLORS else "lines+markers",
                    line=dict(color=colors[name], dash=_DASHES[self.taus.index(row_tau) % len(_DASHES)]),
                    error_y=dict(type="data", array=lines[-1][metric]["plus"], arrayminus=lines[-1][metric]["minus"],
                                 visible=name not in _BASELINE_COLORS),  # a baseline's interval: in the table
                    hovertemplate=f"{name}, τ = {row_tau}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>",
                    visible=view == views[0], opacity=1.0 if row_tau == tau else 0.0,
                    hoverinfo="all" if row_tau == tau else "skip",
                )
        figure.update_layout(
            title=dict(text=self._figure_title(views[0]), y=0.97, yref="container"),
            xaxis=dict(title="residual layer l", dtick=1), yaxis_title=metric, legend_title="checkpoint",
            margin=dict(t=170),
            updatemenus=[self._kind_menu(views, keys), _metric_menu(lines, metric), self._tau_menu(keys, tau)],
            annotations=[dict(text=label, x=x, y=1.2, xref="paper", yref="paper", showarrow=False, xanchor="left",
                              yanchor="bottom") for label, x in (("probe", 0.0), ("metric", 0.25), ("τ", 0.5))],
        )
        return figure

    def _view_rows(self, table: pd.DataFrame, view: str) -> pd.DataFrame:
        """Rows drawn for probe kind ``view``: the checkpoints' probes and the baselines for the same classes;
        a baseline, which has no layer, becomes a flat line over the layers probed."""
        probed = table[(table["probe"] == view) & table["layer"].notna()]
        target = self.settings.target("lens" if view == LOGIT_LENS else view)
        baselines = table[(table["checkpoint"] == BASELINE) & (table["target"] == target)
                          & table["tau"].isin(probed["tau"])]
        layers = sorted(probed["layer"].unique())
        flat = baselines.drop(columns="layer").assign(checkpoint=baselines["probe"]).merge(
            pd.DataFrame({"layer": pd.array(layers, dtype="Int64")}), how="cross")
        return pd.concat([probed, flat], ignore_index=True)

    def _figure_title(self, view: str) -> str:
        what = ("the logit lens (the model's own unembedding, τ = 1 only)" if view == LOGIT_LENS
                else f"{view} probes of x[t+τ] from h[l, t]")
        return f"{what}: held-out score by layer, 95% CI<br><sup>τ by dash: " + ", ".join(
            f"{_DASHES[i % len(_DASHES)]} {tau}" for i, tau in enumerate(self.taus)) + "; baselines flat</sup>"

    def _kind_menu(self, views: list[str], keys: list[tuple[str, int | None]]) -> dict[str, Any]:
        return dict(x=0.0, y=1.12, xanchor="left", yanchor="bottom", active=0, buttons=[
            dict(label=view, method="update",
                 args=[{"visible": [key_view == view for key_view, _ in keys]},
                       {"title.text": self._figure_title(view)}])
            for view in views])

    def _tau_menu(self, keys: list[tuple[str, int | None]], tau: int) -> dict[str, Any]:
        def shown(choice: int | None, key_tau: int | None) -> bool:
            return key_tau is None or choice is None or key_tau == choice
        buttons = [dict(label="all τ" if choice is None else f"τ = {choice}", method="restyle", args=[{
            "opacity": [1.0 if shown(choice, key_tau) else 0.0 for _, key_tau in keys],
            "hoverinfo": ["all" if shown(choice, key_tau) else "skip" for _, key_tau in keys],
        }]) for choice in [*self.taus, None]]
        return dict(x=0.5, y=1.12, xanchor="left", yanchor="bottom", active=self.taus.index(tau), buttons=buttons)

    # ---- display

    def __repr__(self) -> str:
        computed = ", ".join(f"{kind} ({len(names)}/{len(self.names)})" for kind, names in self.computed.items())
        return (f"Comparison({', '.join(self.names)}; τ {','.join(map(str, self.taus))}; "
                f"computed: {computed or 'nothing yet'}; folder {self.folder})")

    def _repr_html_(self) -> str:
        kinds = list(dict.fromkeys([*self.computed, self.settings.kind]))
        head = "".join(f"<th>{html.escape(kind)}</th>" for kind in kinds)
        body = []
        for name in self.names:
            source = (
                "made on first use"
                if name == CONTROL and name not in self._checkpoints
                else self._checkpoint(name).source
            )
            layers = (
                ("all" if self.settings.layers is None else span_text(sorted(set(self.settings.layers))))
                if name == CONTROL and name not in self._checkpoints
                else span_text(self.layers(name))
            )
            marks = "".join(f"<td>{'✓' if (name, kind) in self._scores else '·'}</td>" for kind in kinds)
            body.append(f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(str(source))}</code></td>"
                        f"<td>{layers}</td>{marks}</tr>")
        heldout = (f"{len(self._heldout[1])} held-out sequences of {self._heldout[1].shape[1]} tokens"
                   if self._heldout else f"up to {self.settings.max_sequences} held-out sequences (not read yet)")
        return (f"<div><b>Comparison</b> of {len(self.names)} checkpoints · τ {', '.join(map(str, self.taus))} · "
                f"{heldout}<table><tr><th>checkpoint</th><th>source</th><th>layers</th>{head}</tr>{''.join(body)}"
                f"</table><small>✓ computed, · not yet · cached in <code>{html.escape(str(self.folder))}</code> "
                "(caches/: residual streams, scores/: probe scores)</small></div>")


def _pair(item: CheckpointSource | tuple[str, CheckpointSource]) -> tuple[str, CheckpointSource]:
    """``(name, source)`` from a pair, or from a source alone (named after its folder)."""
    if isinstance(item, tuple):
        return item
    if isinstance(item, (str, Path)):
        return Path(item).name, item
    if isinstance(item, LMCheckpoint):
        return Path(item.source).name, item
    raise ForethoughtError("name checkpoints held in memory: pass {name: model} or (name, model) pairs")


@quiet_loading()
def _load(name: str, source: CheckpointSource, folder: Path, tokenizer: PreTrainedTokenizerBase | None) -> LMCheckpoint:
    """An :class:`LMCheckpoint` from any source; a model in memory is saved under ``folder/models/<name>``."""
    if isinstance(source, LMCheckpoint):
        return source
    if isinstance(source, PreTrainedModel):
        tokenizer = tokenizer or gpt2_tokenizer()
        check_vocabulary(tokenizer, source.config.vocab_size, f"checkpoint {name!r}")
        saved = folder / "models" / name.replace("/", "_")
        source.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        source = saved
    return load_checkpoint(name, source)


def _metric(metric: str) -> str:
    if metric not in METRICS:
        raise ForethoughtError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def _columns(line: pd.DataFrame) -> dict[str, dict[str, list[float]]]:
    """{metric: {value, plus, minus}} of one line's rows, by layer, as lists (what the metric menu swaps in)."""
    columns = {}
    for metric, rows in line.groupby("metric"):
        rows = rows.sort_values("layer")
        columns[metric] = {"value": rows["value"].tolist(), "plus": (rows["ci_high"] - rows["value"]).tolist(),
                           "minus": (rows["value"] - rows["ci_low"]).tolist()}
    return columns


def _metric_menu(lines: list[dict[str, dict[str, list[float]]] | None], metric: str) -> dict[str, Any]:
    """Buttons that swap every line's y and error bars to another metric (legend entries keep [None])."""
    def column(line, m: str, part: str) -> list:
        return [None] if line is None else line[m][part]
    buttons = [dict(label=m, method="update", args=[{
        "y": [column(line, m, "value") for line in lines],
        "error_y.array": [column(line, m, "plus") for line in lines],
        "error_y.arrayminus": [column(line, m, "minus") for line in lines],
    }, {"yaxis.title.text": m}]) for m in METRICS]
    return dict(x=0.25, y=1.12, xanchor="left", yanchor="bottom", active=METRICS.index(metric), buttons=buttons)

