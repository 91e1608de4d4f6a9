"""Across runs: the spread between seeds is computed exactly, sign flips are named, the trend reads model sizes."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from forethought.analyses.across import AcrossConfig, SeedsResults, run_seeds, run_trend
from forethought.analyses.results import tidy, write_results
from forethought.core.errors import ForethoughtError
from forethought.models.gpt2 import gpt2_config

GAP = "myopia gap (myopic − vanilla)"
PRECACHE = "pre-caching (vanilla − myopic)"
MATCHED = "pre-caching, loss-matched (vanilla at the myopic loss − myopic)"


def _gap_run(folder, gap: tuple[float, float, float], vanilla_loss: float, model_folder=None,
             estimates: tuple[str, ...] = (PRECACHE,), parameters: int | None = None):
    rows = [
        {
            "checkpoint": "vanilla",
            "metric": "loss",
            "tau": 1,
            "value": vanilla_loss,
            "ci_low": vanilla_loss - 0.01,
            "ci_high": vanilla_loss + 0.01,
            "n": 100,
        },
        {"checkpoint": GAP, "metric": "loss", "tau": 1, "value": gap[0], "ci_low": gap[1], "ci_high": gap[2], "n": 100},
        {
            "checkpoint": GAP,
            "metric": "loss",
            "tau": 1,
            "position": 0,
            "value": 0.0,
            "ci_low": -1,
            "ci_high": 1,
            "n": 5,
        },
    ]
    for estimate in estimates:
        for layer in range(2):
            for tau in (1, 2):
                value = gap[0] * (layer + tau)
                rows.append({"checkpoint": estimate, "layer": layer, "tau": tau, "metric": "top1", "value": value,
                             "ci_low": value - 0.01, "ci_high": value + 0.01, "n": 50})
    meta = {"config": {"vanilla": "v", "myopic": "m", "out": str(folder)},
            "checkpoints": {"vanilla": str(model_folder) if model_folder else "v"},
            **({"parameters": {"vanilla": parameters}} if parameters else {})}
    write_results(tidy(rows, task="text", split="test", seed=0), folder, meta)
    return str(folder)


def test_seed_spread_is_exact_and_names_sign_flips(tmp_path):
    runs = [_gap_run(tmp_path / f"s{i}", gap, 4.0 + i) for i, gap in
            enumerate([(0.02, 0.01, 0.03), (0.04, 0.03, 0.05), (-0.01, -0.02, 0.001)])]
    results = run_seeds(AcrossConfig(runs=tuple(runs), labels=("a", "b", "c"), out=str(tmp_path / "seeds")))
    gap = results.gap().iloc[0]
    assert gap["mean"] == pytest.approx(0.05 / 3) and gap["sd"] == pytest.approx(np.std([0.02, 0.04, -0.01], ddof=1))
    assert (gap["min"], gap["max"], gap["runs_above_0"], gap["runs_below_0"]) == (-0.01, 0.04, 2, 0)
    assert gap["sign"] == "flips" and gap["value@b"] == 0.04
    vanilla = results.table[results.table["checkpoint"] == "vanilla"].iloc[0]
    assert vanilla["sign"] == "+" and vanilla["mean"] == pytest.approx(5.0)
    assert "mean +0.0167 ± sd 0.0252, sign flips" in results.summary()
    assert set(results.figures()) == {"seeds_gap", "seeds_precache_heatmap"}
    figure = results.gap_figure()  # mean ± sd said in the subtitle, not in a label over the last run's bar
    assert "mean +0.017 ± sd 0.025 between runs" in figure.layout.title.text and not figure.layout.annotations
    reloaded = SeedsResults.from_folder(tmp_path / "seeds")  # the table round-trips through its folder
    pd.testing.assert_frame_equal(reloaded.table, results.table, check_dtype=False)


def test_every_estimate_of_the_bracket_gets_its_seeds_heatmap(tmp_path):
    beyond, matched = "beyond vanilla (mtp − vanilla)", "beyond vanilla, loss-matched (mtp − vanilla at equal loss)"
    runs = [_gap_run(tmp_path / f"s{i}", (0.02 + i / 100, 0.01, 0.05), 4.0, estimates=(PRECACHE, beyond, matched))
            for i in range(2)]
    figures = run_seeds(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "seeds"))).figures()
    assert set(figures) == {"seeds_gap", "seeds_precache_heatmap", "seeds_precache_mtp_heatmap",
                            "seeds_precache_mtp_matched_heatmap"}
    assert figures["seeds_precache_mtp_heatmap"].layout.title.text.startswith(
        "P_mtp = top-1(mtp) − top-1(vanilla): mean ± sd over 2 seeds")
    assert figures["seeds_precache_heatmap"].data[0].z[1][1] == pytest.approx(0.025 * 3)  # layer 1, τ 2
    cells = [cell for row in figures["seeds_precache_heatmap"].data[0].text for cell in row]
    assert all(cell.count("<br>") == 1 for cell in cells) and any("n.s." in cell for cell in cells)  # two lines


def test_one_sign_in_every_run_is_reported_as_holding(tmp_path):
    runs = [_gap_run(tmp_path / f"s{i}", (0.02 + i / 100, 0.01, 0.05), 4.0) for i in range(2)]
    results = run_seeds(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "seeds")))
    assert results.gap().iloc[0]["sign"] == "+"
    precache = results.table[results.table["checkpoint"] == PRECACHE]
    assert len(precache) == 4 and (precache["sign"] == "+").all() and (precache["runs_above_0"] == 2).all()


def test_the_trend_reads_each_runs_model_size(tmp_path):
    sizes = {}
    for name, (layers, width) in {"small": (2, 64), "large": (4, 128)}.items():
        gpt2_config(n_layer=layers, d_model=width, n_head=2, vocab_size=300, n_positions=64).save_pretrained(
            tmp_path / name
        )
        sizes[name] = _gap_run(tmp_path / f"gap-{name}", (0.01 * layers, 0.0, 0.1), 4.0, tmp_path / name)
    config = AcrossConfig(runs=tuple(sizes.values()), labels=("small", "large"), out=str(tmp_path / "trend"))
    results = run_trend(config)
    table = results.table.set_index("run")
    assert table.loc["small", "parameters"] == 2 * (12 * 64 * 64 + 13 * 64) + 2 * 64  # blocks + final norm
    assert table.loc["large", "value"] == pytest.approx(0.04)
    assert set(results.figures()) == {"trend_gap"}
    assert "slope: not testable (needs ≥ 3 runs at ≥ 2 sizes)" in results.summary()  # two runs: no degree left


def test_the_trend_reads_a_recorded_size_without_the_checkpoint(tmp_path):
    """A run whose meta.json records its vanilla twin's size needs no checkpoint (a run's table kept alone); a run
    with neither is refused in one line."""
    runs = [_gap_run(tmp_path / f"gap-{n}", (0.01 * i, 0.0, 0.1), 4.0, parameters=n)
            for i, n in enumerate((1_000, 10_000, 100_000), start=1)]
    results = run_trend(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "trend")))
    assert results.table["parameters"].tolist() == [1_000, 10_000, 100_000]
    assert results.slope()["slope"] == pytest.approx(0.01)
    bare = _gap_run(tmp_path / "gap-bare", (0.02, 0.0, 0.1), 4.0)
    with pytest.raises(ForethoughtError, match="records no model size and its vanilla checkpoint"):
        run_trend(AcrossConfig(runs=(runs[0], bare), out=str(tmp_path / "trend-bare")))


def test_the_trend_tests_its_slope_over_seeds_and_sizes(tmp_path):
    """Three sizes × two seeds: the per-size spread is exact, and the slope, its interval and p are those of
    ordinary least squares on log10(parameters), computed here by hand."""
    runs, gaps = [], {}
    for layers in (1, 2, 4):
        config = tmp_path / f"config-{layers}"
        gpt2_config(n_layer=layers, d_model=64, n_head=2, vocab_size=300, n_positions=64).save_pretrained(config)
        for seed, noise in enumerate((-0.004, 0.006)):
            gaps[f"l{layers}s{seed}"] = 0.02 * layers + noise
            runs.append(_gap_run(tmp_path / f"gap-{layers}-{seed}", (gaps[f"l{layers}s{seed}"], 0.0, 0.2), 4.0,
                                 config))
    results = run_trend(AcrossConfig(runs=tuple(runs), labels=tuple(gaps), out=str(tmp_path / "trend")))
    sizes = results.sizes()
    assert sizes["runs"].tolist() == [2, 2, 2] and sizes["sd"].to_numpy() == pytest.approx([0.01 / np.sqrt(2)] * 3)
    assert sizes["mean"].to_numpy() == pytest.approx([0.021, 0.041, 0.081])
    x = np.log10(results.table["parameters"].to_numpy(float))
    y = results.table["value"].to_numpy(float)
    sxx = ((x - x.mean()) ** 2).sum()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / sxx
    residual = y - y.mean() - slope * (x - x.mean())
    stderr = np.sqrt((residual**2).sum() / (len(y) - 2) / sxx)
    trend = results.slope()
    assert trend["slope"] == pytest.approx(slope) and trend["p"] == pytest.approx(2 * stats.t.sf(slope / stderr, 4))
    assert trend["ci_high"] - trend["slope"] == pytest.approx(stats.t.ppf(0.975, 4) * stderr)
    assert (trend["runs"], trend["sizes"]) == (6, 3) and trend["p"] < 0.01
    assert "OLS of 6 runs' values on log10 parameters at 3 sizes" in results.summary()
    figure = results.figure()
    assert any(trace.name.startswith("OLS: +") for trace in figure.data)
    drawn, means = figure.data[0].x, figure.data[1].x  # a size's two runs beside its mean, not on it
    assert len(set(drawn)) == 6 and sorted(means) == sorted(set(results.table["parameters"]))
    for size in means:
        mine = sorted(x for x in drawn if abs(np.log10(x / size)) < 0.05)
        assert len(mine) == 2 and mine[0] < mine[1] < size and np.log10(mine[1] / mine[0]) == pytest.approx(0.012)
    two = run_trend(AcrossConfig(runs=tuple(runs[:4]), labels=tuple(gaps)[:4], out=str(tmp_path / "trend-2")))
    figure = two.figure()  # two sizes: a slope to test, but a line would only join their means
    assert np.isfinite(two.slope()["slope"]) and not any(trace.mode == "lines" for trace in figure.data)
    assert "4 runs at 2 sizes" in figure.layout.title.text and "no line drawn" in figure.layout.title.text


def test_the_trend_of_precache_runs_reads_p_at_the_best_vanilla_layer_on_validation(tmp_path):
    """P (or P_matched) at τ = 2, at the layer where the vanilla twin's probe is best on *validation* (not where P or
    the test score is largest); each in its own figure."""
    runs = []
    for layers in (1, 2):
        config = tmp_path / f"config-{layers}"
        gpt2_config(n_layer=layers, d_model=64, n_head=2, vocab_size=300, n_positions=64).save_pretrained(config)
        rows = []
        for layer in range(3):
            p_value = 0.01 * layers + 0.1 * (layer == 2)  # P largest at layer 2 …
            for estimate, value in ((PRECACHE, p_value), (MATCHED, p_value / 2)):
                rows.append({"checkpoint": estimate, "layer": layer, "tau": 2, "metric": "top1", "value": value,
                             "ci_low": value - 0.01, "ci_high": value + 0.01, "n": 50, "split": "test"})
            for split, best in (("validation", 1), ("test", 2)):  # … the vanilla probe best at 1 on validation
                rows.append({"checkpoint": "vanilla", "probe": "softmax", "layer": layer, "tau": 2, "metric": "top1",
                             "value": 0.5 if layer == best else 0.2, "ci_low": 0.1, "ci_high": 0.6, "n": 50,
                             "split": split})
        meta = {"config": {"vanilla": "v", "myopic": "m"}, "checkpoints": {"vanilla": str(config)}}
        write_results(tidy(rows, task="text", seed=0), tmp_path / f"pre-{layers}", meta)
        runs.append(str(tmp_path / f"pre-{layers}"))
    results = run_trend(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "trend")))
    table = results.table.set_index("run")
    assert table["layer"].tolist() == [1, 1] and table["value"].to_numpy() == pytest.approx([0.01, 0.02])
    assert table["quantity"].iloc[0] == "pre-caching P (top-1, τ = 2, best vanilla layer)"
    assert set(results.figures()) == {"trend_precache_tau2"}
    matched = run_trend(AcrossConfig(runs=tuple(runs), loss_matched=True, out=str(tmp_path / "trend-matched")))
    assert matched.table["value"].to_numpy() == pytest.approx([0.005, 0.01])
    assert matched.table["layer"].tolist() == [1, 1]
    assert matched.table["quantity"].iloc[0] == "pre-caching P_matched (top-1, τ = 2, best vanilla layer)"
    assert set(matched.figures()) == {"trend_precache_matched_tau2"}
    gaps = [_gap_run(tmp_path / f"gap-{n}", (0.1, 0.09, 0.11), 4.0, parameters=1000 * n) for n in (1, 2)]
    with pytest.raises(ForethoughtError, match="`loss_matched` reads precache runs: gap-1 is a gap run"):
        run_trend(AcrossConfig(runs=tuple(gaps), loss_matched=True, out=str(tmp_path / "trend-gap")))
    with pytest.raises(ForethoughtError, match="holds neither a myopia gap nor a pre-caching estimate at τ = 3"):
        run_trend(AcrossConfig(runs=tuple(runs), tau=3, out=str(tmp_path / "trend3")))


def test_bad_run_lists_are_one_line_errors(tmp_path):
    with pytest.raises(ForethoughtError, match="at least two run folders"):
        AcrossConfig(runs=("only-one",))
    with pytest.raises(ForethoughtError, match="labels lists 'x' twice"):
        AcrossConfig(runs=("a", "b"), labels=("x", "x"))
    with pytest.raises(ForethoughtError, match="`labels` must name every run once"):
        AcrossConfig(runs=("a", "b"), labels=("x",))
    with pytest.raises(ForethoughtError, match="cannot read results in"):
        run_seeds(AcrossConfig(runs=(f"{tmp_path}/nope", f"{tmp_path}/nope2"), out=str(tmp_path / "seeds")))


def test_a_run_made_before_a_setting_existed_joins_the_later_ones_but_another_command_does_not(tmp_path):
    runs = [_gap_run(tmp_path / f"s{i}", (0.02, 0.01, 0.03), 4.0) for i in range(3)]
    for run in runs[1:]:  # the later runs record the settings added since (hidden, nonlinear)
        meta = json.loads((Path(run) / "meta.json").read_text())
        meta["config"].update(hidden=256, nonlinear=False)
        (Path(run) / "meta.json").write_text(json.dumps(meta))
    assert len(run_seeds(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "seeds"))).table) > 0
    meta = json.loads((Path(runs[0]) / "meta.json").read_text())
    meta["config"]["kind"] = "softmax"  # a setting of another command
    (Path(runs[0]) / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ForethoughtError, match="the runs come from different commands"):
        run_seeds(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "seeds2")))


def test_a_run_folder_may_be_moved_or_named_with_a_trailing_slash(tmp_path):
    runs = tuple(_gap_run(tmp_path / f"s{i}", (0.02, 0.01, 0.03), 4.0) for i in range(2))
    run_seeds(AcrossConfig(runs=runs, out=str(tmp_path / "seeds")))
    run_seeds(AcrossConfig(runs=runs, out=str(tmp_path / "seeds") + "/"))  # the same run folder
    (tmp_path / "seeds").rename(tmp_path / "moved")
    run_seeds(AcrossConfig(runs=runs, out=str(tmp_path / "moved")))
    with pytest.raises(ForethoughtError, match=r"holds a run with other settings \(labels: None → \['x', 'y'\]\)"):
        run_seeds(AcrossConfig(runs=runs, labels=("x", "y"), out=str(tmp_path / "moved")))
    (tmp_path / "moved" / "config.json").write_text('{"runs": ')  # torn by a crash of another program
    with pytest.raises(ForethoughtError, match=r"config.json is damaged \(.*\); remove .*moved to start afresh"):
        run_seeds(AcrossConfig(runs=runs, out=str(tmp_path / "moved")))


def test_the_seeds_heatmap_marks_cells_by_a_test_across_seeds_controlled_over_the_grid(tmp_path):
    """P with each run's interval above 0 but a spread between seeds as large as its mean: the t-test across seeds
    (not the runs' own intervals) decides, and Benjamini–Hochberg over the grid marks it "n.s."."""
    runs = [_gap_run(tmp_path / f"s{i}", gap, 4.0) for i, gap in
            enumerate([(0.01, 0.005, 0.02), (0.05, 0.04, 0.06), (0.09, 0.08, 0.10)])]
    results = run_seeds(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "seeds")))
    precache = results.table[results.table["checkpoint"] == PRECACHE].sort_values(["layer", "tau"])
    values = precache[[f"value@s{i}" for i in range(3)]].to_numpy()
    expected = [stats.ttest_1samp(row, 0.0).pvalue for row in values]
    np.testing.assert_allclose(precache["p_across_runs"], expected)
    assert (precache["runs_above_0"] >= 2).all() and (precache["p_across_runs"] > 0.05).all()
    heatmap = results.figures()["seeds_precache_heatmap"]
    assert all(text.endswith(" n.s.") for row in heatmap.data[0].text for text in row)


def test_whole_model_quantities_name_their_split(tmp_path):
    """Runs without paired differences (path-star, the synthetic twins) list every quantity, train and test apart."""
    runs = []
    for seed in range(2):
        rows = [{"checkpoint": "vanilla", "metric": "exact_path", "target": "path", "split": split, "value": value,
                 "ci_low": value - 0.01, "ci_high": value + 0.01, "n": 100}
                for split, value in (("train", 0.6 + seed / 10), ("test", 0.5 + seed / 10))]
        write_results(tidy(rows, task="pathstar:reverse", seed=seed), tmp_path / f"s{seed}",
                      {"config": {"seed": seed, "out": str(tmp_path / f"s{seed}")}})
        runs.append(str(tmp_path / f"s{seed}"))
    lines = run_seeds(AcrossConfig(runs=tuple(runs), out=str(tmp_path / "seeds"))).summary().splitlines()
    assert lines[0].endswith("whole-model quantities, positions pooled:")
    assert any(" path train exact_path: +0.6000" in line and "mean +0.6500" in line for line in lines)
    assert any(" path test exact_path: +0.5000" in line and "mean +0.5500" in line for line in lines)
