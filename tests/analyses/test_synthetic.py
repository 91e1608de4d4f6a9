"""The synthetic experiment end to end on a tiny setting: table, files, resume, refusals."""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import pandas as pd
import pytest
import torch

from forethought.analyses.causal import CAUSAL_COLUMNS, LEACE, NET, RANDOM
from forethought.analyses.results import COLUMNS, read_results
from forethought.analyses.synthetic import CONTROL, SyntheticConfig, SyntheticResults, run_synthetic
from forethought.core.errors import ForethoughtError
from forethought.core.settings import flat_settings
from forethought.models.checkpoint import latest_checkpoint, load_training_state

TINY = dict(n_terms=3, freq=2.0, seq_len=10, n_layer=2, d_model=16, n_head=2, steps=40, batch_size=16,
            heldout_sequences=48, eval_every=20, checkpoint_every=20, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "run"
    return run_synthetic(SyntheticConfig.from_preset("cpu", **TINY, out=str(out))), out


def test_table_is_tidy_and_complete(tiny_run):
    results, out = tiny_run
    table = results.table
    split = COLUMNS.index("split")
    assert list(table.columns) == [*COLUMNS[:split], *CAUSAL_COLUMNS, *COLUMNS[split:]]
    probes = table[table["metric"] == "r2"]
    assert set(probes["checkpoint"]) == {"vanilla", "myopic", CONTROL}
    assert set(probes["layer"]) == {0, 1, 2}
    assert sorted(set(probes["tau"])) == [-5, -4, -3, -2, -1, 0]  # lookbacks 0 … n_terms + 2
    assert len(probes) == 3 * 3 * 2 * 6  # models × layers × targets × lookbacks
    assert (probes["ci_low"] <= probes["value"]).all() and (probes["value"] <= probes["ci_high"]).all()
    losses = results.losses()
    assert set(losses.index) == {"vanilla", "myopic", CONTROL, "trivial (predict 0)"}
    assert losses.loc["trivial (predict 0)", "ratio_to_trivial"] == 1.0


def test_the_causal_test_reads_each_offset_beside_its_control(tiny_run):
    results, _ = tiny_run
    rows = results.table[results.table["metric"] == "delta_huber"]
    assert set(rows["checkpoint"]) == {"vanilla", "myopic", CONTROL} and set(rows["layer"]) == {0, 1, 2}
    assert set(rows["edit"]) == {LEACE, RANDOM, NET}
    assert set(rows["offset"].dropna()) == set(range(5))  # 0 … n_terms + 1
    for _, cell in rows.groupby(["checkpoint", "layer"]):
        by_edit = {edit: part.sort_values("offset", na_position="last")["value"].to_numpy()
                   for edit, part in cell.groupby("edit")}
        np.testing.assert_allclose(by_edit[NET], by_edit[LEACE] - by_edit[RANDOM], atol=1e-12)  # paired
    last = rows[(rows["layer"] == 2) & (rows["path"] == "future")]
    assert (last["value"] == 0).all()  # h[L, t] feeds no keys or values
    assert results.causal().shape == (3 * 3, 5) and len(results.causal_figure().data) == 3 * 3


def test_files_round_trip(tiny_run):
    results, out = tiny_run
    table, meta = read_results(out)
    pd.testing.assert_frame_equal(table, results.table)
    assert pd.read_csv(out / "results.csv").shape == results.table.shape
    assert meta["config"]["steps"] == 40
    for package in ("torch", "transformers", "transformer-lens"):  # a number traces to the versions that made it
        assert meta["versions"][package] == metadata.version(package)
    assert "git_revision" in meta and "synthetic pre-caching task" in meta["data"]
    for stem in ("synthetic_probe_r2", "synthetic_loss", "synthetic_causal"):
        assert (out / "figures" / f"{stem}.html").stat().st_size > 1000
    reloaded = SyntheticResults.from_folder(out)
    assert reloaded.histories == results.histories
    assert "vanilla" in reloaded.summary() and "random init" in reloaded.summary()


def test_figures_hold_the_data(tiny_run):
    results, _ = tiny_run
    probe = results.probe_figure()
    assert {trace.name for trace in probe.data} == {"layer 0", "layer 1", "layer 2"}
    assert len(probe.data) == 3 * 3 * 2  # layers × checkpoints × targets
    loss = results.loss_figure()
    assert {trace.name for trace in loss.data} >= {"vanilla (train)", "myopic (held out)"}


def test_rerun_resumes_and_reproduces(tiny_run):
    results, out = tiny_run
    again = run_synthetic(SyntheticConfig.from_preset("cpu", **TINY, out=str(out)))
    pd.testing.assert_frame_equal(again.table, results.table)


def test_two_fresh_runs_of_one_seed_and_thread_count_give_identical_tables(tiny_run, tmp_path):
    """A seeded run repeats bit for bit with the threads it recorded (issue 26: numbers moved with the threads)."""
    results, out = tiny_run
    meta = json.loads((out / "meta.json").read_text())
    assert meta["threads"] == torch.get_num_threads() and meta["deterministic_algorithms"] is False
    again = run_synthetic(SyntheticConfig.from_preset("cpu", **TINY, out=str(tmp_path / "again")))
    pd.testing.assert_frame_equal(again.table, results.table, check_exact=True)


def test_a_run_made_before_a_setting_existed_reruns_as_the_same_run(tiny_run):
    """config.json written before myopic_cut existed: the default it had then (residual) binds the folder."""
    results, out = tiny_run
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "myopic_cut"}))
    again = run_synthetic(SyntheticConfig.from_preset("cpu", **TINY, out=str(out)))
    pd.testing.assert_frame_equal(again.table, results.table)
    with pytest.raises(ForethoughtError, match=r"other settings \(myopic_cut: 'residual' → 'kv'\)"):
        run_synthetic(SyntheticConfig.from_preset("cpu", **TINY, myopic_cut="kv", out=str(out)))


def test_the_myopic_cut_reaches_the_myopic_twins_training(tmp_path):
    out = tmp_path / "kv"
    run_synthetic(SyntheticConfig.from_preset("cpu", **{**TINY, "steps": 2}, myopic_cut="kv", out=str(out)))
    cuts = {twin: load_training_state(latest_checkpoint(out / twin))["config"]["myopic_cut"]
            for twin in ("vanilla", "myopic")}
    assert cuts == {"vanilla": "kv", "myopic": "kv"}  # the setting is the run's; only the myopic twin uses it
    with pytest.raises(ForethoughtError, match="unknown myopic cut 'diagonal'"):
        SyntheticConfig.from_preset("cpu", myopic_cut="diagonal")


def test_rerun_with_other_settings_is_refused_and_changes_nothing(tiny_run):
    _, out = tiny_run
    before = (out / "config.json").read_text()
    with pytest.raises(ForethoughtError, match=r"holds a run with other settings \(lr: 0.001 → 0.01\)"):
        run_synthetic(SyntheticConfig.from_preset("cpu", **{**TINY, "lr": 0.01}, out=str(out)))
    assert (out / "config.json").read_text() == before


def test_given_checkpoints_are_evaluated_without_training(tiny_run, tmp_path):
    results, out = tiny_run
    checkpoints = {name: str(sorted((out / name / "checkpoints").iterdir())[-1]) for name in ("vanilla", "myopic")}
    again = run_synthetic(SyntheticConfig.from_preset(
        "cpu", **TINY, out=str(tmp_path / "eval"),
        vanilla_checkpoint=checkpoints["vanilla"], myopic_checkpoint=checkpoints["myopic"],
    ))
    pd.testing.assert_frame_equal(again.table, results.table)
    assert not (tmp_path / "eval" / "vanilla").exists()


def test_presets_and_settings_are_checked(tmp_path):
    assert set(SyntheticConfig.PRESETS) == {"paper", "cpu"}
    paper = SyntheticConfig.from_preset("paper")
    training = paper.training
    assert (paper.n_layer, paper.d_model, paper.n_head, training.batch_size, training.lr) == (2, 128, 2, 512, 1e-3)
    assert (paper.p, paper.n_terms, paper.freq, paper.seq_len) == (1.0, 10, 10.0, 64)
    cpu_changes = {
        k for k, v in json.loads(json.dumps(SyntheticConfig.PRESETS["cpu"])).items() if flat_settings(paper)[k] != v
    }
    allowed = {"d_model", "n_layer", "n_head", "seq_len", "steps", "batch_size", "p", "n_terms", "freq",
               "heldout_sequences", "eval_every", "checkpoint_every", "out"}  # seq_len = context size
    assert cpu_changes <= allowed
    with pytest.raises(ForethoughtError, match="unknown preset 'gpu'"):
        SyntheticConfig.from_preset("gpu")
    with pytest.raises(ForethoughtError, match="seq_len=5 leaves no position"):
        SyntheticConfig.from_preset("cpu", seq_len=5, n_terms=3)
