"""Figures. Every function returns a ``go.Figure``; :func:`save_figure` writes HTML (and PNG if it can)."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from forethought.probes.metrics import bh_significant, fdr_significant

_CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "chrome")
PALETTE = px.colors.qualitative.D3  # every figure's line colours, in order (the control takes D3's gray)


METRIC_TITLES = {  # axis titles of the probe metrics: words and units
    "top1": "top-1 accuracy (fraction of held-out positions)",
    "top5": "top-5 accuracy (fraction of held-out positions)",
    "cross_entropy": "cross-entropy (nats per position)",
}


def measured_layers(figure: go.Figure, layers: pd.Series) -> go.Figure:
    """x-axes showing only the layers measured (ticks at them, no room for layers that do not exist; over many,
    a label at every 2nd, 5th, … layer); where the measured layers skip some (0, 15, 30), points are not joined: a
    line would claim the layers between."""
    measured = sorted({int(layer) for layer in layers.dropna()})
    every = next(step for step in (1, 2, 5, 10, 20, 50) if len(measured) <= 12 * step)  # ≤ ~12 labels: 31 of
    labels = [str(layer) if layer % every == 0 else "" for layer in measured]  # them overlapped in a narrow facet
    figure.update_xaxes(tickvals=measured, ticktext=labels, range=[measured[0] - 0.5, measured[-1] + 0.5])
    if any(axis.matches for axis in figure.select_yaxes()):  # facets: plotly.js leaves matched y axes at their
        figure.update_yaxes(autorange=True, selector=lambda axis: axis.range is None)  # empty −1 … 4: ask again
    if any(later - earlier > 1 for earlier, later in zip(measured, measured[1:])):
        figure.update_traces(mode="markers", selector=lambda trace: "lines" in (trace.mode or "") and trace.x
                             is not None and len(trace.x) > 1)
    return figure


def facet_labels_as_values(figure: go.Figure, width: int = 18) -> go.Figure:
    """Panel titles "checkpoint=vanilla" → "vanilla" (plotly express names the column too), broken into lines of
    at most ``width`` characters so that neighbours do not overlap."""
    def relabel(note: go.layout.Annotation) -> None:
        if note.text and "=" in note.text:
            value = note.text.split("=", 1)[1]
            note.update(text="<br>".join(textwrap.wrap(value, width)) or value)
    return figure.for_each_annotation(relabel)


def probe_r2_figure(table: pd.DataFrame, title: str = "Probe R² on held-out sequences") -> go.Figure:
    """R² of ridge probes by lookback j (x), one line per layer; one column per checkpoint, one row per target.

    ``table``: tidy rows with metric "r2" and tau = −j.
    """
    rows = table[table["metric"] == "r2"].assign(
        lookback=lambda t: -t["tau"].astype(int),
        layer=lambda t: "layer " + t["layer"].astype(str),
        plus=lambda t: t["ci_high"] - t["value"],
        minus=lambda t: t["value"] - t["ci_low"],
    )
    figure = px.line(
        rows, x="lookback", y="value", color="layer", facet_col="checkpoint", facet_row="target",
        error_y="plus", error_y_minus="minus", markers=True,
        category_orders={"checkpoint": list(dict.fromkeys(rows["checkpoint"]))},
        labels={"lookback": "lookback j (the probe at position t reads x[t−j])", "value": "R²"},
        title=title,
    )
    figure.update_yaxes(range=[-0.05, 1.05])
    return facet_labels_as_values(figure)


def loss_curves_figure(
    histories: dict[str, list[dict[str, float]]],
    baseline: float | None = None,
    baseline_name: str = "trivial",
    title: str = "Training loss",
) -> go.Figure:
    """Training loss (faint) and held-out loss (bold) by step for each run; ``baseline`` dashed."""
    figure = go.Figure()
    for color, (name, history) in zip(PALETTE, histories.items()):
        frame = pd.DataFrame(history)
        figure.add_scatter(x=frame["step"], y=frame["train_loss"], name=f"{name} (train)",
                           line=dict(color=color, width=1), opacity=0.35)
        if "eval_loss" in frame:
            held_out = frame.dropna(subset=["eval_loss"])
            figure.add_scatter(x=held_out["step"], y=held_out["eval_loss"], name=f"{name} (held out)",
                               line=dict(color=color, width=3))
    if baseline is not None:  # a trace, not add_hline: hline annotations misplace on log axes
        steps = [min(h[0]["step"] for h in histories.values()), max(h[-1]["step"] for h in histories.values())]
        figure.add_scatter(x=steps, y=[baseline, baseline], name=baseline_name, mode="lines",
                           line=dict(color="black", dash="dash"))
    figure.update_layout(title=title, xaxis_title="step", yaxis_title="loss (log scale)", yaxis_type="log")
    values = np.concatenate([np.asarray(trace.y, dtype=float) for trace in figure.data])
    ticks = log_ticks(np.nanmin(values[values > 0]), np.nanmax(values))
    figure.update_yaxes(tickvals=ticks, ticktext=[f"{tick:g}" for tick in ticks])  # not plotly's bare "2, 3, 5"
    return figure


def log_ticks(low: float, high: float) -> list[float]:
    """Round tick values for a log axis over the data's ``low`` … ``high`` (and a little beyond): 1, 2, 3, 5 × 10ᵉ
    over a wide range; over a narrow one the coarsest of steps of 1, 0.5, 0.2, 0.1 × 10ᵉ that puts at least three
    inside the data (a fine-tuning curve within 3.2 … 4.6 nats had one label, "4")."""
    decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
    for step in (1.0, 0.5, 0.2, 0.1):
        mantissas = (1, 2, 3, 5) if high / low >= 4 else np.arange(1, 10, step)
        ticks = [round(m * 10.0**e, 12) for e in decades for m in mantissas if low / 1.2 <= m * 10.0**e <= high * 1.2]
        if high / low >= 4 or sum(low <= tick <= high for tick in ticks) >= 3:
            break
    return ticks


FDR_NOTE = "n.s.: not significant at a 5% false-discovery rate over the grid (Benjamini–Hochberg)"


def signed(value: float, digits: int = 3) -> str:
    """``value`` with its sign, to ``digits`` decimals; one that rounds to zero is "0.000", never "-0.000"."""
    rounded = round(float(value), digits)
    return f"{0.0:.{digits}f}" if rounded == 0 else f"{rounded:+.{digits}f}"


def difference_heatmap(rows: pd.DataFrame, title: str, colorbar: str) -> go.Figure:
    """Layer × τ heatmap of differences (tidy rows with layer, tau, value, and ci_low, ci_high — or a p-value
    column ``p``), centred at 0; cells not significant over the whole grid (:data:`FDR_NOTE`) are marked "n.s."."""
    value = rows.pivot(index="layer", columns="tau", values="value")
    if "p" in rows:
        significant = bh_significant(rows.pivot(index="layer", columns="tau", values="p").to_numpy())
    else:
        low, high = (rows.pivot(index="layer", columns="tau", values=column) for column in ("ci_low", "ci_high"))
        significant = fdr_significant(value.to_numpy(), low.to_numpy(), high.to_numpy())
    text = np.where(significant, value.map(signed), value.map(lambda v: f"{signed(v)}<br>n.s."))
    bound = float(np.nanmax(np.abs(value.to_numpy())))
    if bound == 0:  # a scale of ±1 would make nothing look like a result
        title += "<br><sup>every difference is exactly 0: these probes do not tell the two apart</sup>"
    figure = go.Figure(go.Heatmap(
        z=value.to_numpy(), x=[f"τ = {tau}" for tau in value.columns], y=[str(layer) for layer in value.index],
        text=text, texttemplate="%{text}", colorscale="RdBu", zmid=0, zmin=-bound or -1e-3, zmax=bound or 1e-3,
        colorbar=dict(title=colorbar),
    ))
    figure.update_layout(title=title, xaxis_title="offset τ", yaxis_title="residual layer l")
    return figure


def interval_line(figure: go.Figure, rows: pd.DataFrame, x: str, name: str, column: int, **line: Any) -> None:
    """Rows' ``value`` over column ``x`` (sorted) with ``ci_low`` … ``ci_high`` error bars, into panel (1, column);
    in the legend once (from the first panel)."""
    rows = rows.sort_values(x)
    figure.add_scatter(x=rows[x].astype(int), y=rows["value"], mode="lines+markers", name=name, line=line,
                       showlegend=column == 1, row=1, col=column,
                       error_y=dict(type="data", symmetric=False, array=rows["ci_high"] - rows["value"],
                                    arrayminus=rows["value"] - rows["ci_low"]))


MENU_LABEL = "menu label"  # the name of an annotation that labels a dropdown menu (left out of PNGs)
PLOTLY_JS = "plotly.min.js"  # written once beside the HTML figures of a folder, which load it from there
TITLE_WIDTH = 110  # characters of a figure title's line: what fits the 1100-pixel picture


def chromium() -> str | None:
    """The installed Chromium (for kaleido's PNG export and the browser test), if any; never downloaded."""
    return next((path for name in _CHROMIUM if (path := shutil.which(name))), None)


def png_export_available() -> bool:
    """PNG export needs a Chromium for kaleido; ``FORETHOUGHT_PNG=0`` turns it off (each export starts Chromium,
    ~2.5 s: the test suite keeps it off)."""
    return os.environ.get("FORETHOUGHT_PNG", "1") != "0" and chromium() is not None


def save_figure(figure: go.Figure, stem: str | Path, scale: float = 2.0) -> list[Path]:
    """Write ``<stem>.html`` always and ``<stem>.png`` when Chromium is installed; return what was written (with
    the folder's :data:`PLOTLY_JS`: the HTML loads plotly.js from beside it, so it draws offline, without the
    4.8 MB of the library in every figure)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    figure = go.Figure(figure)
    title = figure.layout.title.text or ""
    if "<br>" not in title:  # a long title in lines that fit the picture's width (it was cut off at the right)
        figure.layout.title.text = "<br>".join(textwrap.wrap(title, TITLE_WIDTH))
    title_lines = (figure.layout.title.text or "").count("<br>") + 1
    label_lines = max([(note.text or "").count("<br>") + 1 for note in figure.layout.annotations], default=1)
    if figure.layout.margin.t is None:  # room for the title's lines above the panels' (as plotly's 100 px for one)
        figure.layout.margin.t = max(100, 40 + 30 * title_lines + 18 * label_lines)
    written = [stem.with_suffix(".html"), stem.parent / PLOTLY_JS]
    figure.write_html(written[0], include_plotlyjs="directory")
    if png_export_available():
        static_figure(figure).write_image(stem.with_suffix(".png"), scale=scale, width=1100, height=650)
        written.append(stem.with_suffix(".png"))
    return written


def static_figure(figure: go.Figure) -> go.Figure:
    """``figure`` for a picture: without its dropdown menus and their labels (annotations named
    :data:`MENU_LABEL`), which do nothing there; the view it opens on is what is drawn."""
    static = go.Figure(figure)
    static.layout.updatemenus = ()
    static.layout.annotations = [note for note in figure.layout.annotations if note.name != MENU_LABEL]
    return static
