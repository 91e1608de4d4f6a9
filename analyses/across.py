"""Results across runs: the spread between training seeds (``forethought seeds``) and the trend with model
size (``forethought trend``: the spread per size and an OLS test of the slope), read from finished ``gap`` /
``precache`` / ``probe`` run folders.

A bootstrap interval over held-out sequences says how precisely one trained model was measured, not what the
next training seed would give. ``seeds`` puts the two side by side for every quantity the runs share: each
run's value and interval, the mean and standard deviation between runs, their range, how many runs' intervals
lie above or below 0, and whether the sign holds in every run ("flips" where it does not). ``trend`` plots the
myopia gap of twin pairs against their non-embedding parameter count (Wu et al.: the gap grows with size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from scipy import stats
from transformers import AutoConfig, AutoModelForCausalLM

from forethought.analyses.experiment import ExperimentResults, finish_run, prepare_out, writes_run
from forethought.analyses.plots import difference_heatmap, signed
from forethought.analyses.probing import SINCE_ADDED, VALIDATION, best_by_tau
from forethought.analyses.results import CONTROL, read_results, run_meta
from forethought.core.errors import ForethoughtError
from forethought.core.settings import check_settings
from forethought.models.families import non_embedding_parameters
from forethought.models.gpt2 import quiet_loading
from forethought.probes.metrics import across_runs_p, bh_significant

KEYS = ["checkpoint", "task", "layer", "position", "tau", "target", "probe", "metric", "split"]
GAP_SUFFIX = "(myopic − vanilla)"  # the checkpoint name of the myopia gap rows ends so
PRECACHE_SUFFIX = "(vanilla − myopic)"  # and the pre-caching estimate's
MATCHED_SUFFIX = "(vanilla at the myopic loss − myopic)"  # and the loss-matched estimate's
SEEDS_HEATMAPS = (  # (the estimate's name ends with, figure stem, what it is) of precache runs' estimates
    (PRECACHE_SUFFIX, "seeds_precache_heatmap", "P = top-1(vanilla) − top-1(myopic)"),
    (MATCHED_SUFFIX, "seeds_precache_matched_heatmap",
     "P_matched = top-1(vanilla at the myopic twin's loss) − top-1(myopic)"),
    ("(mtp − vanilla)", "seeds_precache_mtp_heatmap", "P_mtp = top-1(mtp) − top-1(vanilla)"),
    ("(mtp − vanilla at equal loss)", "seeds_precache_mtp_matched_heatmap",
     "P_mtp at equal loss = top-1(mtp) − top-1(vanilla), the better one's run at the other's loss"),
)


@dataclass
class AcrossConfig:
    """Settings of ``forethought seeds`` and ``forethought trend``; every field is a flag."""

    runs: tuple[str, ...] = ()  # finished run folders (gap, precache or probe) of one command
    labels: tuple[str, ...] | None = None  # names for the runs (default: their folder names)
    tau: int = 2  # trend of precache runs: P at this τ, at the vanilla twin's best layer on validation
    loss_matched: bool = False  # trend of precache runs: P_matched (vanilla at the myopic loss − myopic), not P
    out: str = "runs/seeds"  # folder for the table, meta.json and figures
    figures_dir: str | None = None  # also copy the figures here

    def __post_init__(self):
        check_settings(self)
        if len(self.run_folders()) < 2:
            raise ForethoughtError("give at least two run folders in `runs`")
        if len(set(self.run_labels())) != len(self.run_folders()):
            raise ForethoughtError("`labels` must name every run once, in the order of `runs`")

    def run_folders(self) -> list[str]:
        return [run.rstrip("/") for run in self.runs]

    def run_labels(self) -> list[str]:
        return [Path(folder).name for folder in self.run_folders()] if self.labels is None else list(self.labels)


def read_runs(config: AcrossConfig) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, Any]]]:
    """{label: table}, {label: meta} of the runs, refusing runs of different commands (other setting names; a
    setting added since a run was made, :data:`~analyses.probing.SINCE_ADDED`, does not count)."""
    tables, metas = {}, {}
    for label, folder in zip(config.run_labels(), config.run_folders()):
        tables[label], metas[label] = read_results(folder)
    kinds = {label: tuple(sorted(set(meta.get("config", {})) | set(SINCE_ADDED))) for label, meta in metas.items()}
    if len(set(kinds.values())) != 1:
        raise ForethoughtError(f"the runs come from different commands: {', '.join(kinds)} do not share settings")
    return tables, metas


def spread(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per quantity the runs share (the results table's key columns): ``value@RUN``, ``ci_low@RUN``,
    ``ci_high@RUN`` for each run, then ``mean``, ``sd`` (between runs, ddof 1), ``min``, ``max``,
    ``runs_above_0`` / ``runs_below_0`` (intervals excluding 0 on that side), ``sign`` ("+", "−" where every
    run's value has that sign, else "flips") and ``p_across_runs`` (a one-sample t-test of the run values against
    0: what the spread between seeds says, :func:`probes.metrics.across_runs_p`)."""
    wide = None
    for label, table in tables.items():
        part = table.set_index(KEYS)[["value", "ci_low", "ci_high"]]
        part = part[~part.index.duplicated()]
        part.columns = [f"{column}@{label}" for column in part.columns]
        wide = part if wide is None else wide.join(part, how="inner")
    labels = list(tables)
    values = wide[[f"value@{label}" for label in labels]].to_numpy(dtype=float)
    lows = wide[[f"ci_low@{label}" for label in labels]].to_numpy(dtype=float)
    highs = wide[[f"ci_high@{label}" for label in labels]].to_numpy(dtype=float)
    with np.errstate(invalid="ignore"):
        wide = wide.assign(
            mean=values.mean(1), sd=values.std(1, ddof=1), min=values.min(1), max=values.max(1),
            runs_above_0=(lows > 0).sum(1), runs_below_0=(highs < 0).sum(1),
            sign=np.where(values.min(1) > 0, "+", np.where(values.max(1) < 0, "−", "flips")),
            p_across_runs=across_runs_p(values),
        )
    return wide.reset_index()


@dataclass
class SeedsResults(ExperimentResults):
    """The spread of every shared quantity over the runs (``table``: :func:`spread`'s columns)."""

    CONFIG: ClassVar[type] = AcrossConfig

    def differences(self, metrics: tuple[str, ...] = ("loss", "top1")) -> pd.DataFrame:
        """The rows of paired differences — myopia gap, pre-caching, probe or logit lens − skip-bigram (the
        random-init control left out) — for ``metrics``, pooled over positions."""
        table = self.table
        paired = (table["checkpoint"].str.contains(" − ", regex=False)
                  | table["probe"].fillna("").str.contains(" − ", regex=False))
        return table[paired & table["position"].isna() & table["metric"].isin(metrics)
                     & (table["checkpoint"] != CONTROL)]

    def gap(self) -> pd.DataFrame:
        """The overall myopia gap (loss, positions pooled): one row, each run's value and the spread."""
        rows = self.differences(("loss",))
        return rows[rows["checkpoint"].str.endswith(GAP_SUFFIX)]

    def figures(self) -> dict[str, go.Figure]:
        figures = {}
        if not self.gap().empty:
            figures["seeds_gap"] = self.gap_figure()
        for suffix, stem, difference in SEEDS_HEATMAPS:
            rows = self.table[self.table["checkpoint"].str.endswith(suffix) & (self.table["metric"] == "top1")
                              & (self.table["split"] == "test")]
            if not rows.empty:
                figures[stem] = self.heatmap(rows, difference)
        return figures

    def _labels(self) -> list[str]:
        return [column.split("@", 1)[1] for column in self.table.columns if column.startswith("value@")]

    def gap_figure(self) -> go.Figure:
        """Each run's overall myopia gap with its 95 % interval (resampling documents), and the mean ± sd between
        runs."""
        row = self.gap().iloc[0]
        labels = self._labels()
        figure = go.Figure(go.Scatter(
            x=labels, y=[row[f"value@{label}"] for label in labels], mode="markers", marker=dict(size=10),
            name="one run: 95% CI resampling held-out documents",
            error_y=dict(type="data", symmetric=False,
                         array=[row[f"ci_high@{label}"] - row[f"value@{label}"] for label in labels],
                         arrayminus=[row[f"value@{label}"] - row[f"ci_low@{label}"] for label in labels]),
        ))
        figure.add_hrect(y0=row["mean"] - row["sd"], y1=row["mean"] + row["sd"], fillcolor="gray", opacity=0.2,
                         line_width=0)
        # the mean's value goes in the subtitle: a label on its line would sit on the last run's bar
        figure.add_hline(y=row["mean"], line=dict(color="gray"))
        figure.add_hline(y=0, line=dict(color="black", dash="dot"))
        figure.update_layout(title="Myopia gap (held-out loss, myopic − vanilla) of each training seed<br><sup>each "
                                   "run: its 95% CI resampling held-out documents; line and band: mean "
                                   f"{row['mean']:+.3f} ± sd {row['sd']:.3f} between runs</sup>",
                             xaxis_title="run", yaxis_title="nats per token")
        return figure

    def heatmap(self, rows: pd.DataFrame, difference: str = SEEDS_HEATMAPS[0][2]) -> go.Figure:
        """The mean of a paired estimate over runs per (layer, τ) (``difference`` says which: P by default); cells
        say mean ± sd and how many runs' intervals exclude 0, and "n.s." where the t-test across runs is not
        significant over the grid (Benjamini–Hochberg, 5 % false-discovery rate) — two lines, as the per-run
        heatmap's, so that the text stays legible on SmolLM2's 31 layers."""
        n = len(self._labels())
        cells = rows.assign(value=rows["mean"], p=rows["p_across_runs"])
        figure = difference_heatmap(cells, difference, "mean")
        significant = bh_significant(rows["p_across_runs"].to_numpy())
        text = rows.assign(text=[f"{signed(r['mean'])} ± {r['sd']:.3f}<br>{r['runs_above_0']}↑ {r['runs_below_0']}↓"
                                 + (" flips" if r["sign"] == "flips" else "") + ("" if marked else " n.s.")
                                 for (_, r), marked in zip(rows.iterrows(), significant)])
        grid = text.pivot(index="layer", columns="tau", values="text")
        figure.update_traces(text=grid.to_numpy(), texttemplate="%{text}")
        figure.update_layout(title=f"{difference}: mean ± sd over {n} seeds<br><sup>k↑ / k↓: runs whose 95% CI lies "
                                   "above / below 0; flips: the runs' values lie on both sides of 0; n.s.: t-test "
                                   "across seeds not significant at a 5% false-discovery rate over the grid</sup>",
                             margin=dict(t=110))
        return figure

    def headline(self) -> pd.DataFrame:
        """The paired differences if the runs have any (gap, precache, probe runs), else every whole-model
        quantity (no layer, positions pooled: the synthetic twins' losses, path-star accuracies)."""
        rows = self.differences()
        if rows.empty:
            rows = self.table[self.table["layer"].isna() & self.table["position"].isna()]
        return rows

    def summary(self) -> str:
        labels = self._labels()
        paired = not self.differences().empty
        lines = [f"{len(labels)} runs: {', '.join(labels)}; "
                 f"{'paired differences' if paired else 'whole-model quantities'}, positions pooled:"]
        for _, row in self.headline().iterrows():
            where = ", ".join(f"{k} {row[k]}" for k in ("layer", "tau") if not pd.isna(row[k]))
            named_by = ("probe",) if paired else ("probe", "task", "target", "split")  # train and test apart
            name = row["checkpoint"] + "".join(f" {row[k]}" for k in named_by if isinstance(row[k], str))
            runs = "  ".join(f"{row[f'value@{label}']:+.4f} "
                             f"[{row[f'ci_low@{label}']:+.4f}, {row[f'ci_high@{label}']:+.4f}]" for label in labels)
            lines.append(f"  {name} {row['metric']}{' (' + where + ')' if where else ''}: {runs}  →  "
                         f"mean {row['mean']:+.4f} ± sd {row['sd']:.4f}, sign {row['sign']}")
        return "\n".join(lines)


@writes_run
def run_seeds(config: AcrossConfig) -> SeedsResults:
    """The spread between runs (e.g. training seeds) of every quantity they share; table, meta and figures."""
    tables, metas = read_runs(config)
    out = prepare_out(config.out, config)
    results = SeedsResults(config=config, table=spread(tables))
    finish_run(results, out, run_meta(runs=dict(zip(config.run_labels(), config.run_folders()))))
    return results


def run_size(label: str, meta: dict[str, Any]) -> int:
    """Non-embedding parameters of a run's vanilla twin: as its ``meta.json`` records them (so that a run's table
    alone suffices), or, for runs from before they were recorded, counted from the checkpoint's config."""
    recorded = meta.get("parameters", {}).get("vanilla")
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    source = meta.get("checkpoints", {}).get("vanilla")
    if not isinstance(source, str) or not (Path(source) / "config.json").is_file():
        raise ForethoughtError(f"run {label} records no model size and its vanilla checkpoint ({source}) is not "
                               "there to count it from: rerun its `gap` / `precache`")
    return model_size(source)


@quiet_loading()
def model_size(source: str) -> int:
    """Non-embedding parameters of a checkpoint (built from its config; the weights are not read)."""
    return non_embedding_parameters(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)))


@dataclass
class TrendResults(ExperimentResults):
    """The myopia gap (``gap`` runs) or the pre-caching estimate P (``precache`` runs) of each run against its model
    size (``table``: run, parameters, quantity, layer, value, ci_low, ci_high), the spread of the runs (training
    seeds) of each size, and the test of the slope."""

    CONFIG: ClassVar[type] = AcrossConfig

    def sizes(self) -> pd.DataFrame:
        """Per model size (non-embedding parameters): the runs, their mean gap, sd (ddof 1), min and max."""
        return self.table.groupby("parameters")["value"].agg(runs="count", mean="mean", sd="std", min="min",
                                                            max="max")

    def slope(self) -> dict[str, float]:
        """The trend with size: ordinary least squares of every run's value on log10(parameters) — seeds are
        replicates, so the slope's spread includes the seed spread —, per tenfold parameters with its 95 %
        interval and the two-sided t-test of slope = 0 (``scipy.stats.linregress``; runs − 2 degrees of freedom).
        NaN where that leaves no degree of freedom (fewer than 3 runs, or one size)."""
        x, y = np.log10(self.table["parameters"].to_numpy(float)), self.table["value"].to_numpy(float)
        runs, sizes = len(y), len(np.unique(x))
        if runs < 3 or sizes < 2:
            return dict(slope=np.nan, intercept=np.nan, ci_low=np.nan, ci_high=np.nan, p=np.nan, runs=runs,
                        sizes=sizes)
        fit = stats.linregress(x, y)
        half = stats.t.ppf(0.975, runs - 2) * fit.stderr
        return dict(slope=fit.slope, intercept=fit.intercept, ci_low=fit.slope - half, ci_high=fit.slope + half,
                    p=fit.pvalue, runs=runs, sizes=sizes)

    def figure(self) -> go.Figure:
        """Each run's value (95 % CI over documents) at its size, each size's mean ± sd over runs, the OLS line."""
        rows = self.table.sort_values(["parameters", "run"])
        before = rows.groupby("parameters").cumcount(ascending=False) + 1  # runs of a size side by side, left of
        rows = rows.assign(drawn_at=rows["parameters"] * 10 ** (-RUN_SPREAD * before))  # their mean
        figure = px.scatter(rows, x="drawn_at", y="value", hover_name="run", hover_data={"parameters": True,
                            "drawn_at": False}, log_x=True, error_y=rows["ci_high"] - rows["value"],
                            error_y_minus=rows["value"] - rows["ci_low"])
        figure.update_traces(name="a run (95% CI over documents; drawn left of its size)", showlegend=True)
        sizes = self.sizes().reset_index()
        figure.add_scatter(x=sizes["parameters"], y=sizes["mean"], mode="markers", name="mean ± sd over runs",
                           error_y=dict(array=sizes["sd"].fillna(0)), marker=dict(symbol="diamond", size=11))
        trend = self.slope()
        if np.isfinite(trend["slope"]) and trend["sizes"] >= 3:  # a line through two sizes only joins them
            x = np.log10(sizes["parameters"].to_numpy(float))
            figure.add_scatter(x=sizes["parameters"], y=trend["intercept"] + trend["slope"] * x, mode="lines",
                               line=dict(color="gray", dash="dash"),
                               name=f"OLS: {signed(trend['slope'], 4)} per 10× (p = {trend['p']:.2g})")
        figure.add_hline(y=0, line=dict(color="black", dash="dot"))
        figure.update_xaxes(tickvals=sizes["parameters"], ticktext=[f"{n / 1e6:.3g} M" for n in sizes["parameters"]])
        quantity = rows["quantity"].iloc[0]
        fitted = (f"OLS slope {signed(trend['slope'], 4)} per 10×, p = {trend['p']:.2g}" if np.isfinite(trend["slope"])
                  else "no slope: it needs ≥ 3 runs at ≥ 2 sizes")
        if np.isfinite(trend["slope"]) and trend["sizes"] < 3:
            fitted += " (two sizes: no line drawn)"
        figure.update_layout(title=f"{quantity} by model size<br><sup>{len(rows)} runs at {trend['sizes']} sizes; "
                                   f"{fitted}</sup>", xaxis_title="non-embedding parameters",
                             yaxis_title="nats per token" if quantity == GAP_QUANTITY else "top-1 difference",
                             margin=dict(t=100, r=40), legend=dict(orientation="h", y=-0.25))
        return figure

    def figures(self) -> dict[str, go.Figure]:
        """trend_gap, or trend_precache[_matched]_tauN (P or P_matched at τ = N)."""
        if self.table["quantity"].iloc[0] == GAP_QUANTITY:
            return {"trend_gap": self.figure()}
        return {f"trend_precache{'_matched' if self.config.loss_matched else ''}_tau{self.config.tau}": self.figure()}

    def summary(self) -> str:
        trend = self.slope()
        slope = ("slope: not testable (needs ≥ 3 runs at ≥ 2 sizes)" if not np.isfinite(trend["slope"]) else
                 f"slope {trend['slope']:+.4f} per tenfold parameters (95% CI {trend['ci_low']:+.4f} … "
                 f"{trend['ci_high']:+.4f}), p = {trend['p']:.3g}: OLS of {trend['runs']} runs' values on log10 "
                 f"parameters at {trend['sizes']} sizes, two-sided t-test")
        return "\n".join([self.table.to_string(index=False, float_format=lambda v: f"{v:+.4f}"), "per size:",
                          self.sizes().to_string(float_format=lambda v: f"{v:+.4f}"), slope])


GAP_QUANTITY = "myopia gap (myopic − vanilla held-out loss)"
RUN_SPREAD = 0.012  # log10 units between the runs of one size in the trend figure: apart, and off their mean


@writes_run
def run_trend(config: AcrossConfig) -> TrendResults:
    """The overall myopia gap of ``gap`` runs, or P (``config.loss_matched``: P_matched) at τ = ``config.tau`` of
    ``precache`` runs (top-1, at the layer where the vanilla twin's probe is best on the validation sequences: chosen
    without the test examples), against their models' non-embedding parameters; table, figure."""
    tables, metas = read_runs(config)
    rows = []
    for label, table in tables.items():
        row = _trend_row(label, table, config.tau, config.loss_matched)
        rows.append({"run": label, "parameters": run_size(label, metas[label]), **row})
    out = prepare_out(config.out, config)
    results = TrendResults(config=config, table=pd.DataFrame(rows))
    finish_run(results, out, run_meta(runs=dict(zip(config.run_labels(), config.run_folders()))))
    return results


def _trend_row(label: str, table: pd.DataFrame, tau: int, matched: bool) -> dict[str, Any]:
    """A run's quantity, layer, value and interval: its overall myopia gap, or its P (``matched``: P_matched) at
    ``tau`` (top-1, test split) at the vanilla twin's best layer on validation."""
    overall = (table["metric"] == "loss") & table["position"].isna()
    gap = table[table["checkpoint"].str.endswith(GAP_SUFFIX) & overall]
    if not gap.empty:
        if matched:
            raise ForethoughtError(f"`loss_matched` reads precache runs: {label} is a gap run")
        return {"quantity": GAP_QUANTITY, "layer": np.nan, **gap.iloc[0][["value", "ci_low", "ci_high"]]}
    estimate = MATCHED_SUFFIX if matched else PRECACHE_SUFFIX
    precache = table[table["checkpoint"].str.endswith(estimate) & (table["metric"] == "top1")
                     & (table["split"] == "test") & (table["tau"] == tau)]
    vanilla = table[(table["checkpoint"] == "vanilla") & (table["split"] == VALIDATION) & table["layer"].notna()
                    & (table["tau"] == tau)]
    if precache.empty or vanilla.empty:
        estimate = "loss-matched pre-caching estimate" if matched else "pre-caching estimate"
        raise ForethoughtError(f"run {label} holds neither a myopia gap nor a {estimate} at τ = {tau} with "
                               "validation scores: give finished `forethought gap` or `precache` runs")
    layer = best_by_tau(vanilla, "top1")[tau]
    row = precache[precache["layer"] == layer].iloc[0]
    return {"quantity": f"pre-caching {'P_matched' if matched else 'P'} (top-1, τ = {tau}, best vanilla layer)",
            "layer": layer,
            **row[["value", "ci_low", "ci_high"]]}
