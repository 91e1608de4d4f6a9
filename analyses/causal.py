"""What the causal tests share (plumbing for ``intervene``, :meth:`Comparison.intervene` and the synthetic
experiment): the edits compared, the table's extra columns, Δloss rows by path and offset with document-level
intervals, the test on a probing engine's held-out sample, and its tables and figures. The method:
docs/causal.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from forethought.analyses.engine import Probing
from forethought.analyses.plots import FDR_NOTE, PALETTE, difference_heatmap, interval_line, measured_layers
from forethought.analyses.probing import check_top_k
from forethought.core.errors import ForethoughtError
from forethought.core.files import check_folder_digests, staged_folder, write_folder_digests
from forethought.models.heldout import token_losses
from forethought.models.train import resolve_device
from forethought.probes.erasure import ConceptEraser, ErasureFit, linear_r2, mlp_gain
from forethought.probes.future import FutureProbeConfig
from forethought.probes.metrics import mean_scores
from forethought.probes.paths import edited_positions, path_effects
from forethought.probes.split import ProbeSplit

LEACE = "leace"  # the concept erased
RANDOM, SHUFFLED = "random", "shuffled"  # the controls: random directions; LEACE of an unrelated (shuffled) concept
CONTROLS = (RANDOM, SHUFFLED)


def net(control: str) -> str:
    """The edit name of the paired difference "LEACE − ``control``", example by example."""
    return f"{LEACE} − {control}"


NET = net(RANDOM)
CAUSAL_COLUMNS = ["edit", "rank", "path", "offset"]  # a causal table's columns beyond the tidy ones
CHECK_FIT_ROWS, CHECK_TEST_ROWS = 100_000, 20_000  # positions the erasure check fits and scores its probe on
TEST_FRACTION = FutureProbeConfig.test_fraction  # share of the clusters the effects are read on: the probes' split


def erasers(fit: ErasureFit, rank: int, seed: int, controls: Sequence[str] = (RANDOM,),
            unrelated: ErasureFit | None = None) -> dict[str, ConceptEraser]:
    """The concept's erasure at ``rank`` and its ``controls``: :data:`RANDOM`, random whitened directions
    (``seed``) of the same rank, whitened variance and raw variance removed
    (:meth:`~probes.erasure.ErasureFit.random_eraser`); :data:`SHUFFLED`, LEACE at the same rank of the
    ``unrelated`` fit (:func:`shuffled_fit`: a concept of the same classes and frequencies that h does not hold)."""
    concept = fit.eraser(rank)
    made = {LEACE: concept}
    if RANDOM in controls:
        made[RANDOM] = fit.random_eraser(rank, seed, like=concept)
    if SHUFFLED in controls:
        if unrelated is None:
            raise ForethoughtError("the shuffled control needs the unrelated concept's fit")
        made[SHUFFLED] = unrelated.eraser(rank)
    return made


def shuffled_fit(h: np.ndarray, labels: np.ndarray, n_classes: int, seed: int) -> ErasureFit:
    """LEACE's fit of the concept's labels permuted over the rows (seeded): the directions a probe for an unrelated
    target of the same classes and frequencies would pick out of ``h`` [n, d] — the method's own control, where
    :data:`RANDOM` matches the edit's size."""
    return ErasureFit.from_samples(h, np.random.default_rng(seed).permutation(labels), n_classes)


def check_controls(controls: Sequence[str]) -> None:
    """Refuse, in one line, no control or one not in :data:`CONTROLS`."""
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown or not controls:
        raise ForethoughtError(f"unknown control {', '.join(unknown) or '(none given)'}; choose from "
                               f"{', '.join(CONTROLS)}")


def effect_rows(cell: dict[str, Any], effects: dict[str, np.ndarray], clusters: np.ndarray, seed: int,
                metric: str = "delta_loss") -> list[dict[str, Any]]:
    """Rows of each edit's effects [n, positions, offsets 0 … K] (:data:`LEACE` and its controls) and of each
    "leace − control" (:func:`net`: the paired difference, example by example): the mean per offset (path "own" at
    0, "future" from 1) and the future path summed over offsets 1 … K (offset empty); an example is (sequence, t)
    and intervals resample its ``clusters`` [n] (documents)."""
    effects = {**effects, **{net(control): effects[LEACE] - effects[control] for control in CONTROLS
                             if control in effects}}
    rows = []
    for edit, values in effects.items():
        unit = np.repeat(clusters, values.shape[1])
        flat = values.reshape(-1, values.shape[2])
        rows += [{**cell, "edit": edit, "metric": metric, "path": "own" if offset == 0 else "future", "offset": offset,
                  **estimate.columns()} for offset, estimate in enumerate(mean_scores(flat, unit, seed=seed))]
        (future,) = mean_scores(flat[:, 1:].sum(1), unit, seed=seed)
        rows.append({**cell, "edit": edit, "metric": metric, "path": "future", **future.columns()})
    return rows


class CausalViews:
    """Tables and figures of a causal table (``self.table``: tidy rows with :data:`CAUSAL_COLUMNS`), shared by
    ``forethought intervene``'s results and :meth:`analyses.compare.Comparison.intervene`."""

    table: pd.DataFrame
    head: int = 1  # whose loss the table reads: the next token (1), or a multi-token twin's head k (x[t+k])
    given: int = 0  # 0: x[t+τ] erased whole; k: only what h holds about it beyond x[t+k] (:func:`causal_rows`)

    def _scored(self) -> str:
        """"" for the next-token loss of a whole erasure; else which head's loss and what was kept, for titles."""
        return ("" if self.head == 1 else f", head {self.head}'s loss (x[t+{self.head}])") + (
            "" if not self.given else f", x[t+τ] beyond x[t+{self.given}] (its linear readout kept)")

    def effects(self, checkpoint: str, edit: str = NET, rank: int | None = None) -> pd.DataFrame:
        """Own-path and summed future-path Δloss (columns) per (layer, τ) (rows) at ``rank`` (None: full)."""
        rows = self._cell_rows(checkpoint, edit, rank)
        rows = rows[rows["offset"].isna() | (rows["path"] == "own")]
        return rows.pivot_table(index=["layer", "tau"], columns="path", values="value")

    def checks(self, checkpoint: str) -> pd.DataFrame:
        """The erasure checks per (layer, τ, edit, rank): what a fresh linear probe explains of the concept after
        the edit (R²; edit "none": before), what a one-hidden-layer probe still recovers (nats; before, and after
        full-rank LEACE) and the raw variance removed."""
        rows = self.table[(self.table["checkpoint"] == checkpoint)
                          & self.table["metric"].isin(["linear_r2_after", "mlp_gain_after", "removed_variance"])]
        return rows.pivot_table(index=["layer", "tau", "edit", "rank"], columns="metric", values="value")

    def _cell_rows(self, checkpoint: str, edit: str, rank: int | None) -> pd.DataFrame:
        rows = self.table[(self.table["checkpoint"] == checkpoint) & (self.table["metric"] == "delta_loss")
                          & (self.table["edit"] == edit)]
        full = rows.groupby(["layer", "tau"])["rank"].transform("max")
        return rows[rows["rank"] == full] if rank is None else rows[rows["rank"] == rank]

    def controls(self) -> list[str]:
        """The controls this table holds (:data:`CONTROLS`)."""
        return [control for control in CONTROLS if control in set(self.table["edit"])]

    def paths_figure(self, checkpoint: str) -> go.Figure:
        """Δloss by layer, own path and future path, the LEACE edit and its controls (full rank), one panel per
        τ."""
        taus = sorted(self.table.loc[self.table["metric"] == "delta_loss", "tau"].unique())  # not the loss row's
        figure = make_subplots(rows=1, cols=len(taus), shared_yaxes=True,
                               subplot_titles=[f"x[t+{tau}] erased" for tau in taus])
        colors = iter(PALETTE)
        for edit in (LEACE, *self.controls()):
            rows = self._cell_rows(checkpoint, edit, None)
            for path, dash in (("own", "solid"), ("future", "dash")):
                color = next(colors)
                chosen = rows[(rows["path"] == path) & (rows["offset"].isna() if path == "future" else True)]
                for column, tau in enumerate(taus, start=1):
                    interval_line(figure, chosen[chosen["tau"] == tau], "layer", f"{edit}, {path}", column,
                                  color=color, dash=dash)
        figure.add_hline(y=0, line=dict(color="gray", dash="dot"))
        measured_layers(figure.update_xaxes(title_text="residual layer l"),
                        self.table.loc[self.table["checkpoint"] == checkpoint, "layer"])
        figure.update_yaxes(title_text="Δ loss, nats (own: at t; future: t+1 … t+τ summed)", col=1)
        figure.update_layout(title=f"{checkpoint}{self._scored()}: erasing x[t+τ] from h[l, t] — where the loss "
                                   "moves (full-rank LEACE vs controls of equal rank; 95% CI over documents)")
        return figure

    def future_heatmap(self, checkpoint: str, control: str = RANDOM) -> go.Figure:
        """Layer × τ: the future path's Δloss beyond ``control`` (full rank), "n.s." marks by FDR over the grid."""
        rows = self._cell_rows(checkpoint, net(control), None)
        rows = rows[(rows["path"] == "future") & rows["offset"].isna()]
        title = f"{checkpoint}{self._scored()}: future-path Δloss, {net(control)} (full rank). {FDR_NOTE}"
        return difference_heatmap(rows, title, "Δ loss (nats)")

    def causal_figures(self) -> dict[str, go.Figure]:
        """{file stem: figure}: each checkpoint's paths figure and future-path heatmap."""
        figures = {}
        for name in self.table["checkpoint"].dropna().unique():
            stem = (str(name).replace(" ", "_").replace("/", "_") + ("" if self.head == 1 else f"_head{self.head}")
                    + ("" if not self.given else f"_given{self.given}"))
            figures[f"intervene_{stem}_paths"] = self.paths_figure(name)
            for control in self.controls():
                suffix = "" if control == RANDOM else f"_{control}"
                figures[f"intervene_{stem}_future_heatmap{suffix}"] = self.future_heatmap(name, control)
        return figures

    def causal_summary(self) -> str:
        lines = []
        for control in self.controls():
            lines.append(f"Δ loss{self._scored()} when x[t+τ] is erased from h[l, t] at full rank, beyond the "
                         f"{control} control of the same rank (own: at t; future: t+1 … t+τ summed); layers × τ:")
            for name in self.table["checkpoint"].dropna().unique():
                effects = self.effects(name, net(control)).unstack("tau")
                lines += [f"{name}:", effects.to_string(float_format=lambda v: f"{v:+.4f}")]
        return "\n".join(lines)


@dataclass
class CausalResults(CausalViews):
    """A causal table computed in memory (:meth:`analyses.compare.Comparison.intervene`)."""

    table: pd.DataFrame
    given: int = 0


def concept_split(engine: Probing, top_k: int, test_fraction: float = TEST_FRACTION) -> ProbeSplit:
    """The documents the erasers are fitted on and tested on (``test_fraction`` of the clusters), and the concept's
    classes (``top_k`` + "other")."""
    return engine.split(replace(engine.settings.probe_config(str(resolve_device(engine.settings.device)), "topk"),
                                top_k=top_k, test_fraction=test_fraction))


def check_causal(engine: Probing, top_k: int, head: int = 1, test_fraction: float = TEST_FRACTION,
                 given: int = 0) -> None:
    """Refuse, before anything is written, held-out sequences too short for the offsets, a ``head`` a checkpoint
    was not trained with, a ``given`` offset that leaves no τ to erase, and a concept of ``top_k`` + 1 classes that
    could span a checkpoint's residual stream."""
    taus, seq = engine.taus, engine.tokens.shape[1]
    if given < 0:
        raise ForethoughtError(f"given must be 0 (erase x[t+τ] whole) or an offset ≥ 1, got {given}")
    if given and set(taus) <= {given}:
        raise ForethoughtError(f"given {given}: every τ is {given}, and x[t+{given}] beyond itself is nothing; "
                               f"add other taus")
    if seq < (reach := max(*taus, given)) + 1 + head:
        raise ForethoughtError(f"taus reach {reach}, but the held-out sequences have {seq} tokens: "
                               f"the causal test needs at least {reach + 1 + head}")
    for name in engine.names:
        engine.layers(name)  # layers exist
        if head > (heads := engine.checkpoint(name).heads):
            raise ForethoughtError(f"head {head}: {name} has {heads} prediction head(s) (a multi-token twin trained "
                                   f"with --objective mtp:K has K); score head 1 … {heads}")
        check_top_k(top_k, engine.checkpoint(name).model.config.vocab_size)
        width = engine.checkpoint(name).model.config.hidden_size
        if top_k >= width:
            raise ForethoughtError(
                f"top_k {top_k}: the concept's {top_k} + 1 classes can span all {width} residual "
                f"dimensions of {name}, and then full-rank erasure removes everything and its random control is the "
                f"same edit; choose a top_k below {width}")
    concept_split(engine, top_k, test_fraction)  # a sample too small to split is refused here, before any write


def causal_rows(engine: Probing, top_k: int, ranks: Sequence[int], n_positions: int,
                names: Sequence[str] | None = None, controls: Sequence[str] = CONTROLS, cells: Path | None = None,
                head: int = 1, test_fraction: float = TEST_FRACTION,
                given: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The causal test on ``engine``'s held-out sample (its document split, caches and settings: layers, τ, batch,
    seed, device): for each checkpoint of ``names`` (default: all), layer and τ, LEACE of x[t+τ] in the ``top_k``
    most frequent tokens + "other", fitted on the probe-training documents, at each of ``ranks`` and full rank,
    beside its ``controls``, at ``n_positions`` positions t of each test sequence (evenly spaced; the test part:
    ``test_fraction`` of the sample's clusters, the erasers fitted on the rest). With ``cells``
    (a folder of the run, whose settings bind it), each finished (checkpoint, layer) is kept there and a rerun
    reads it back instead of computing it again: an interrupted run resumes to the rows of an uninterrupted one.
    The loss read is the next-token loss (``head`` 1), or that of a multi-token twin's head k, predicting x[s+k] at
    each position s. With ``given`` k ≥ 1 only what h holds about x[t+τ] beyond x[t+k] is erased
    (:meth:`~probes.erasure.ErasureFit.beyond`: x[t+k]'s best linear readout of h is left exactly as it was, and the
    controls avoid its directions too), at the positions t where both exist; τ = k is skipped. Returns (tidy rows,
    meta)."""
    settings = engine.settings
    tokens, taus, seed = engine.tokens, engine.taus, settings.seed
    device = resolve_device(settings.device)
    split = concept_split(engine, top_k, test_fraction)
    classes = np.full(int(tokens.max()) + 1, len(split.classes))  # token → class; "other" last
    classes[split.classes] = np.arange(len(split.classes))
    positions = edited_positions(tokens.shape[1], n_positions, max(taus), lag=head)
    test = torch.from_numpy(tokens[split.test])
    clusters = engine.sample.clusters[split.test]
    rows: list[dict[str, Any]] = []
    for name in names or engine.names:
        model = engine.checkpoint(name).with_heads().to(device).float().eval()
        cache = engine.cache(name)
        losses = token_losses(model, test, settings.batch_sequences, head=head)
        (loss,) = mean_scores(losses.reshape(-1), np.repeat(clusters, losses.shape[1]), seed=seed)
        clean: dict = {}  # prefix caches and unedited losses, shared by every edit of this model
        rows.append({"checkpoint": name, "metric": "loss", "tau": head, "target": scored_target(head),
                     **loss.columns()})
        for layer in engine.layers(name):
            kept = None if cells is None else cells / name / f"layer-{layer:02d}"
            if kept is not None and kept.is_dir():
                rows += _read_cell(kept)
                continue
            layer_rows: list[dict[str, Any]] = []
            residuals = cache.layer(layer)  # [n, T, d]
            for tau in (tau for tau in taus if tau != given):
                (*fit_rows, kept_labels), (*test_rows, _) = (_concept(residuals, tokens, classes, sequences, tau, given)
                                                             for sequences in (split.train, split.test))
                fit = ErasureFit.from_samples(*fit_rows, len(split.classes) + 1)
                unrelated = shuffled_fit(*fit_rows, len(split.classes) + 1, seed) if SHUFFLED in controls else None
                if given:
                    kept_fit = ErasureFit.from_samples(fit_rows[0], kept_labels, len(split.classes) + 1)
                    fit = fit.beyond(kept_fit)
                    unrelated = None if unrelated is None else unrelated.beyond(kept_fit)
                fit_rows = _subsample(fit_rows, CHECK_FIT_ROWS, seed)  # the erasure check's rows
                test_rows = _subsample(test_rows, CHECK_TEST_ROWS, seed)
                cell = {"checkpoint": name, "layer": layer, "tau": tau, "target": f"x[t+{tau}]"}
                layer_rows += _check_rows(cell, None, fit_rows, test_rows, rank=0, edit="none", seed=seed)
                for rank in sorted({min(rank, fit.max_rank) for rank in ranks} | {fit.max_rank}):
                    effects = {}
                    for edit, eraser in erasers(fit, rank, seed, controls, unrelated).items():
                        layer_rows += _check_rows(cell, eraser, fit_rows, test_rows, rank=rank, edit=edit,
                                                  seed=seed, nonlinear=edit == LEACE and rank == fit.max_rank)
                        effects[edit] = path_effects(model, test, partial(eraser.at, layer), positions, tau,
                                                     settings.batch_sequences, clean, head=head)
                    layer_rows += effect_rows({**cell, "rank": rank}, effects, clusters, seed)
            if kept is not None:
                _write_cell(kept, layer_rows)
            rows += layer_rows
    meta = dict(heldout=engine.sample.composition(), positions=positions, classes=len(split.classes) + 1,
                scored=scored_target(head), erased="x[t+τ]" + (f" beyond x[t+{given}]" if given else ""),
                probe_split={part: getattr(split, part).tolist() for part in ("train", "validation", "test")},
                checkpoints={name: engine.checkpoint(name).source for name in names or engine.names})
    return rows, meta


def scored_target(head: int) -> str:
    """What the causal table's loss is the loss of: the next token, or a multi-token twin's head k."""
    return "next token" if head == 1 else f"x[t+{head}] (head {head})"


def _write_cell(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Keep one finished (checkpoint, layer)'s rows, atomically, with their content digest: JSON, whose floats
    round-trip exactly (numpy scalars written as the Python numbers they equal)."""
    def plain(value: Any) -> Any:
        return value.item() if isinstance(value, np.generic) else value
    with staged_folder(folder) as staging:
        (staging / "rows.json").write_text(json.dumps([{k: plain(v) for k, v in row.items()} for row in rows]))
        write_folder_digests(staging)


def _read_cell(folder: Path) -> list[dict[str, Any]]:
    """The rows :func:`_write_cell` kept; a changed or damaged file is a one-line error, never used."""
    rebuild = f"remove {folder} and run the same command again"
    check_folder_digests(folder, rebuild)
    try:
        return json.loads((folder / "rows.json").read_text())
    except (OSError, ValueError) as error:
        raise ForethoughtError(f"{folder / 'rows.json'} is damaged ({error}); {rebuild}") from None


def _concept(residuals: np.ndarray, tokens: np.ndarray, classes: np.ndarray, sequences: np.ndarray, tau: int,
             given: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(h[l, t] [m, d], class of x[t+τ] [m], class of x[t+given] [m] or None) over every position t of
    ``sequences`` where both exist (t < T − max(τ, given))."""
    end = tokens.shape[1] - max(tau, given)
    h = np.asarray(residuals[sequences][:, :end], dtype=np.float64)
    def labels(offset: int) -> np.ndarray:  # [m]
        return classes[tokens[sequences][:, offset: end + offset]].reshape(-1)
    return h.reshape(-1, h.shape[-1]), labels(tau), labels(given) if given else None


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
