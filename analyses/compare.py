"""Compare checkpoints interactively: one object that probes them lazily and draws the comparison.

    comparison = Comparison.from_checkpoints({"vanilla": "runs/lm-cpu-s0-vanilla", "myopic": "runs/lm-cpu-s0-myopic"})
    comparison.figure()                      # probe accuracy by layer; menus for probe kind, metric and τ
    comparison.heatmap("vanilla", "myopic")  # layer × τ paired differences with confidence marks
    comparison.to_dataframe()                # the tidy table (DESIGN.md's columns)
    comparison.probe("vanilla", 3, 2)        # a fitted probe to hold: weight, bias, classes, predict, directions
    comparison.predictions("vanilla", 3, 2)  # its top-5 tokens as text beside the truth and the model's own

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

import pandas as pd
import plotly.graph_objects as go
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from forethought.analyses.causal import (
    CAUSAL_COLUMNS,
    CONTROLS,
    TEST_FRACTION,
    CausalResults,
    causal_rows,
    check_causal,
    check_controls,
)
from forethought.analyses.engine import Probing, load_checkpoint
from forethought.analyses.plots import (
    FDR_NOTE,
    MENU_LABEL,
    METRIC_TITLES,
    PALETTE,
    difference_heatmap,
    measured_layers,
    save_figure,
)
from forethought.analyses.probing import (
    BASELINE,
    LOGIT_LENS,
    PROBE_COLUMNS,
    ProbeSettings,
    check_name,
    check_names,
    saved_probing_run,
    span_text,
)
from forethought.analyses.results import CONTROL, tidy
from forethought.core.errors import ForethoughtError
from forethought.core.settings import check_settings
from forethought.models.gpt2 import quiet_loading
from forethought.models.lm import LMCheckpoint
from forethought.models.tasks.text import check_vocabulary, gpt2_tokenizer
from forethought.models.twins import LossMatch, loss_matched
from forethought.probes.future import METRICS
from forethought.probes.metrics import POOLED

CheckpointSource = str | Path | LMCheckpoint | PreTrainedModel  # folder, run folder, hub id, or in memory
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_BASELINE_COLORS = {"unigram": "#b0b0b0", "skip-bigram": "#404040"}


@dataclass
class CompareConfig:
    """Settings of ``forethought compare``: the comparison figure of a probe or precache run, as interactive HTML
    (menus and legend work in a browser) and PNG."""

    run: str = ""  # the --out folder of a forethought probe or precache run
    add: dict[str, str] = field(default_factory=dict)  # more checkpoints to probe beside the run's, NAME=SOURCE pairs
    figures_dir: str = "figures"  # writes compare_<kind>.html (and .png with Chromium) here
    progress: bool = True  # show progress bars

    def __post_init__(self):
        if not self.run:
            raise ForethoughtError("give `run`: the --out folder of a forethought probe or precache run")
        check_settings(self)


def run_compare(config: CompareConfig) -> Comparison:
    """Open the run, add the extra checkpoints, write the figure; return the comparison."""
    comparison = Comparison.from_folder(config.run, progress=config.progress)
    for name, source in config.add.items():
        comparison.add(name, source)
    save_figure(comparison.figure(), Path(config.figures_dir) / f"compare_{comparison.settings.kind}")
    return comparison


class Comparison(Probing):
    """Future-token probe results of named checkpoints on the same held-out sequences, computed when asked for,
    and drawn: the probing engine (:class:`analyses.engine.Probing`: scores, held probes, predictions, the tidy
    table) with figures on top.

    Build it with :meth:`from_checkpoints` (or :meth:`from_folder` for a ``forethought probe`` / ``precache``
    run). ``settings`` fix the held-out data and the (layer, τ) grid; the probe kind of each request may vary.
    """

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
        :class:`~models.lm.LMCheckpoint` or a model in memory (held as it is, with ``tokenizer``, default: the GPT-2
        tokenizer). ``settings``: fields of :class:`~analyses.probing.ProbeSettings`."""
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

    def add_loss_matched(self, name: str, to: str, as_name: str | None = None) -> LossMatch:
        """Add the checkpoint of ``name``'s training run whose held-out loss on this comparison's sample is nearest
        ``to``'s, as ``as_name`` (default "NAME at the TO loss"): a comparison at equal next-token skill (issue
        26's P_matched) for any pair — match the better model's run to the worse model's loss (a vanilla twin to
        its myopic twin; in the bracket, whichever of the vanilla and multi-token twins is better, to the other).
        Returns the match: the step chosen and every saved checkpoint's loss."""
        for known in (name, to):
            if known not in self._checkpoints:
                raise ForethoughtError(f"no checkpoint named {known!r}; this comparison has {', '.join(self.names)}")
        match = loss_matched(self.checkpoint(name), self.checkpoint(to), torch.from_numpy(self.sample.tokens),
                             self.settings.batch_sequences, self.settings.progress, measured=self._losses)
        self._losses.update(match.measured)  # a later match on this sample measures none of them again
        self.add(as_name or f"{name} at the {to} loss", match.source)
        return match

    # ---- results

    def intervene(self, names: Sequence[str] | None = None, top_k: int = 64, ranks: Sequence[int] = (1, 4, 16, 64),
                  positions: int = 8, controls: Sequence[str] = CONTROLS,
                  test_fraction: float = TEST_FRACTION, given: int = 0) -> CausalResults:
        """The causal test (docs/causal.md) on this comparison's held-out sample, layers and τ: erase x[t+τ] (the
        ``top_k`` most frequent tokens + "other") from h[l, t] by LEACE at each rank and full rank, beside its
        ``controls`` (random directions; LEACE of shuffled labels), at ``positions`` positions t of each test
        sequence (the test documents: ``test_fraction`` of the sample's); Δloss on the own and future paths. ``given``
        k ≥ 1: erase only what h holds about x[t+τ] beyond x[t+k] (x[t+k]'s linear readout kept exactly).
        ``.effects(name)``, ``.checks(name)``, ``.paths_figure(name)``, ``.future_heatmap(name, control)``."""
        check_controls(controls)
        check_causal(self, top_k, test_fraction=test_fraction, given=given)
        rows, _ = causal_rows(self, top_k, ranks, positions, names, controls, test_fraction=test_fraction, given=given)
        return CausalResults(tidy(rows, extra=CAUSAL_COLUMNS, task=f"text: {self.heldout.corpus}",
                                  seed=self.settings.seed, split=POOLED), given=given)

    def to_dataframe(self, kinds: str | Sequence[str] | None = None) -> pd.DataFrame:
        """The tidy table (DESIGN.md's columns) of ``kinds`` (default: those computed, or the settings' kind):
        every checkpoint's probes, their logit lens (τ = 1), the count baselines for those probes' classes, and
        each probe − skip-bigram (:meth:`analyses.engine.Probing.table`)."""
        return tidy(self.table(kinds), PROBE_COLUMNS, task=f"text: {self.heldout.corpus}", seed=self.settings.seed)

    def accuracy(self, kind: str | None = None, metric: str = "top1", layers: Sequence[int] | None = None,
                 taus: Sequence[int] | None = None) -> pd.DataFrame:
        """``metric`` of the probes of ``kind``: (checkpoint, τ) rows × layer columns."""
        kind = self._kind(kind)
        self._check_grid(self.names, layers, taus)
        table = self.to_dataframe(None if kind == LOGIT_LENS else kind)
        rows = table[(table["probe"] == kind) & (table["metric"] == _metric(metric)) & (table["split"] == POOLED)]
        rows = rows[rows["layer"].isin(layers or rows["layer"]) & rows["tau"].isin(taus or rows["tau"])]
        return rows.pivot_table(index=["checkpoint", "tau"], columns="layer", values="value", sort=False)

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

    def figure(
        self, kinds: str | Sequence[str] | None = None, metric: str = "top1", tau: int | None = None
    ) -> go.Figure:
        """Probe ``metric`` by layer, a line per checkpoint (toggled in the legend), the count baselines flat;
        menus choose the probe kind (``kinds`` and the logit lens), the metric, and τ (one, or all by dash)."""
        table = self.to_dataframe(kinds)
        table = table[table["split"] == POOLED]  # the test examples (not the probes' validation scores)
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
            xaxis=dict(title="residual layer l"), yaxis_title=METRIC_TITLES[metric], legend_title="checkpoint",
            margin=dict(t=170),
            updatemenus=[self._kind_menu(views, keys), _metric_menu(lines, metric), self._tau_menu(keys, tau)],
            annotations=[dict(text=label, x=x, y=1.2, xref="paper", yref="paper", showarrow=False, xanchor="left",
                              yanchor="bottom", name=MENU_LABEL)
                         for label, x in (("probe", 0.0), ("metric", 0.25), ("τ", 0.5))],
        )
        return measured_layers(figure, table["layer"])

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
                else self.checkpoint(name).source
            )
            layers = (
                ("all" if self.settings.layers is None else span_text(sorted(set(self.settings.layers))))
                if name == CONTROL and name not in self._checkpoints
                else span_text(self.layers(name))
            )
            marks = "".join(f"<td>{'✓' if (name, kind) in self._scores else '·'}</td>" for kind in kinds)
            body.append(f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(str(source))}</code></td>"
                        f"<td>{layers}</td>{marks}</tr>")
        heldout = (f"{len(self._heldout[1])} held-out sequences of {self._heldout[1].tokens.shape[1]} tokens "
                   f"from {self._heldout[1].composition()['clusters']} document clusters"
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
    """An :class:`LMCheckpoint` from any source; a model in memory is held as it is (with ``tokenizer``, default
    the GPT-2 one), never saved or loaded again."""
    if isinstance(source, LMCheckpoint):
        return source
    if isinstance(source, PreTrainedModel):
        tokenizer = tokenizer or gpt2_tokenizer()
        check_vocabulary(tokenizer, source.config.vocab_size, f"checkpoint {name!r}")
        return LMCheckpoint(f"{name} (in memory)", source, tokenizer, None)
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
    }, {"yaxis.title.text": METRIC_TITLES[m]}]) for m in METRICS]
    return dict(x=0.25, y=1.12, xanchor="left", yanchor="bottom", active=METRICS.index(metric), buttons=buttons)

