"""forethought intervene: erasers fitted on training documents, edits on test documents, paths read exactly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from forethought.analyses import causal
from forethought.analyses.causal import LEACE, NET, RANDOM, SHUFFLED, concept_split, net
from forethought.analyses.cli import main
from forethought.analyses.compare import Comparison
from forethought.analyses.intervene import InterveneConfig, InterveneResults, run_intervene
from forethought.core.errors import ForethoughtError


def test_the_causal_test_on_twins(twins, tmp_path):
    config = InterveneConfig(checkpoints={"vanilla": str(twins / "vanilla"), "myopic": str(twins / "myopic")},
                             max_sequences=60, taus=(1, 2), ranks=(1, 4), positions=3, top_k=20,
                             tokens_root=str(twins / "tokens"), out=str(tmp_path / "iv"), progress=False)
    results = run_intervene(config)
    table = results.table
    effects = table[table["metric"] == "delta_loss"]
    n_layers = int(effects["layer"].max())
    for (_, layer, tau, _), cell in effects.groupby(["checkpoint", "layer", "tau", "rank"]):
        by_edit = {edit: rows.sort_values("offset", na_position="last")["value"].to_numpy()
                   for edit, rows in cell.groupby("edit")}
        np.testing.assert_allclose(by_edit[NET], by_edit[LEACE] - by_edit[RANDOM], atol=1e-12)  # paired
        np.testing.assert_allclose(by_edit[net(SHUFFLED)], by_edit[LEACE] - by_edit[SHUFFLED], atol=1e-12)
        assert len(by_edit[LEACE]) == tau + 2  # offsets 0 … τ and the future path summed
        if layer == n_layers:  # h[L, t] feeds no keys or values: nothing reaches later positions
            assert (cell.loc[cell["path"] == "future", "value"] == 0).all()
    full_rank = effects.groupby(["checkpoint", "layer", "tau"])["rank"].max()  # at most classes − 1 = 20
    assert set(effects["rank"]) >= {1, 4} and full_rank.between(17, 20).all()
    r2 = table[table["metric"] == "linear_r2_after"].set_index(["checkpoint", "layer", "tau", "edit", "rank"])["value"]
    before = r2.xs(("none", 0), level=("edit", "rank"))

    def at_full_rank(edit: str) -> pd.Series:
        rows = r2.xs(edit, level="edit")
        return rows[rows.index.isin([(*cell, rank) for cell, rank in full_rank.items()])].droplevel("rank")

    full = at_full_rank(LEACE)
    assert (full < 0.002).all()  # after full-rank LEACE a fresh linear probe explains nothing on test documents …
    decodable = before[before > 0.01]  # … where, in these briefly trained twins, some cells held a readable concept
    assert len(decodable) >= 1 and (full[decodable.index] < decodable - 0.01).all()
    removed = table[table["metric"] == "removed_variance"].set_index(["checkpoint", "layer", "tau", "rank", "edit"])
    removed = removed["value"].unstack("edit")  # every control beside every edit, its size recorded
    assert set(removed.columns) == {LEACE, RANDOM, SHUFFLED} and (removed > 0).all().all()  # (NaN fails too)
    mlp = table[table["metric"] == "mlp_gain_after"]  # before the edit, and after full-rank LEACE only
    assert set(mlp["edit"]) == {"none", LEACE} and len(mlp) == 2 * len(full_rank) and mlp["value"].notna().all()
    for suffix in ("", "_shuffled"):
        assert (tmp_path / "iv" / "figures" / f"intervene_vanilla_future_heatmap{suffix}.html").is_file()
    again = InterveneResults.from_folder(tmp_path / "iv")
    assert again.table.equals(table) and "beyond the shuffled control" in again.summary()
    # the same test from a Comparison over the same checkpoints and settings: the same table
    comparison = Comparison.from_checkpoints({"vanilla": twins / "vanilla", "myopic": twins / "myopic"},
                                             folder=tmp_path / "cmp", max_sequences=60, taus=(1, 2),
                                             tokens_root=str(twins / "tokens"), progress=False, random_init=False)
    causal = comparison.intervene(["myopic"], top_k=20, ranks=(1, 4), positions=3)
    mine = table[table["checkpoint"] == "myopic"].reset_index(drop=True)
    pd.testing.assert_frame_equal(causal.table.reset_index(drop=True), mine)
    assert causal.effects("myopic").equals(results.effects("myopic"))


def test_an_interrupted_run_resumes_to_the_rows_of_an_uninterrupted_one(twins, tmp_path, monkeypatch):
    """Each finished (checkpoint, layer) is kept in the run folder: a run killed in its second layer reruns only
    what was left and writes the table of a run that was never interrupted; a damaged kept cell is refused."""
    def config(out: str) -> InterveneConfig:
        return InterveneConfig(checkpoints={"vanilla": str(twins / "vanilla")}, max_sequences=60, taus=(1,),
                               ranks=(1,), positions=2, top_k=20, controls=(RANDOM,),
                               tokens_root=str(twins / "tokens"), out=str(tmp_path / out), progress=False)
    whole = run_intervene(config("whole")).table
    calls = []
    real = causal.path_effects

    def killed_in_layer_1(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # layer 0's edits (LEACE, random) at ranks 1 and full are kept; killed in layer 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(causal, "path_effects", killed_in_layer_1)
    with pytest.raises(KeyboardInterrupt):
        run_intervene(config("resumed"))
    kept = tmp_path / "resumed" / "cells" / "vanilla"
    assert sorted(p.name for p in kept.iterdir()) == ["layer-00"]
    calls.clear()
    monkeypatch.setattr(causal, "path_effects", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    pd.testing.assert_frame_equal(run_intervene(config("resumed")).table, whole)
    n_layers = int(whole["layer"].max()) + 1  # layer 0 read back, the others computed
    assert len(calls) == 2 * 2 * (n_layers - 1)  # ranks 1 and full × (LEACE, random) per layer
    rows = kept / "layer-00" / "rows.json"
    rows.write_text(rows.read_text().replace("0.", "1.", 1))
    with pytest.raises(ForethoughtError, match="layer-00/rows.json was changed or damaged"):
        run_intervene(config("resumed"))


def test_a_multi_token_twins_second_head_is_scored(twins, mtp_twin, tmp_path):
    """``head=2`` reads the loss of the twin's second head (x[t+2] at t), which sits on h[L − 1]: an edit of h[L]
    changes it nowhere (while it moves the next-token loss at t), an edit of h[L − 1] does."""
    def config(head: int, out: str) -> InterveneConfig:
        return InterveneConfig(checkpoints={"mtp": str(mtp_twin)}, head=head, max_sequences=60, taus=(1, 2),
                               ranks=(4,), positions=3, top_k=20, controls=(RANDOM,), layers=(1, 2),
                               tokens_root=str(twins / "tokens"), out=str(tmp_path / out), progress=False)
    second, first = (run_intervene(config(head, f"head{head}")) for head in (2, 1))
    loss = {head: results.table.set_index("metric").loc["loss"] for head, results in ((2, second), (1, first))}
    assert loss[2]["target"] == "x[t+2] (head 2)" and loss[1]["target"] == "next token"
    assert loss[2]["value"] > loss[1]["value"]  # two ahead is harder
    own = {head: results.table.query("metric == 'delta_loss' and edit == @LEACE and path == 'own'")
           .set_index(["layer", "tau", "rank"])["value"] for head, results in ((2, second), (1, first))}
    assert (own[2].xs(2, level="layer") == 0).all() and (own[1].xs(2, level="layer") != 0).all()  # L = 2
    assert (own[2].xs(1, level="layer") != 0).all()
    assert "head 2's loss (x[t+2])" in second.summary()
    assert (tmp_path / "head2" / "figures" / "intervene_mtp_head2_paths.html").is_file()
    assert InterveneResults.from_folder(tmp_path / "head2").head == 2


def test_erasing_beyond_the_next_token_skips_it_and_keeps_its_directions(twins, tmp_path):
    """``given=1``: x[t+2] is erased beyond x[t+1] (the exact property: tests/probes/test_erasure.py) — τ = 1 is
    skipped, the effects are not the plain erasure's, the run says what it erased, and a Comparison gives the same
    table."""
    def config(given: int, out: str) -> InterveneConfig:
        return InterveneConfig(checkpoints={"vanilla": str(twins / "vanilla")}, given=given, max_sequences=60,
                               taus=(1, 2), ranks=(4,), positions=2, top_k=20, layers=(1,),
                               tokens_root=str(twins / "tokens"), out=str(tmp_path / out), progress=False)
    plain, beyond = run_intervene(config(0, "plain")), run_intervene(config(1, "beyond"))
    effects = beyond.table.query("metric == 'delta_loss'")
    assert set(effects["tau"]) == {2} and set(plain.table.query("metric == 'delta_loss'")["tau"]) == {1, 2}
    assert not np.allclose(*(results.effects("vanilla").loc[(1, 2)].to_numpy() for results in (plain, beyond)))
    assert "x[t+τ] beyond x[t+1] (its linear readout kept)" in beyond.summary()
    assert (tmp_path / "beyond" / "figures" / "intervene_vanilla_given1_paths.html").is_file()
    assert [title.text for title in beyond.paths_figure("vanilla").layout.annotations] == ["x[t+2] erased"]
    assert InterveneResults.from_folder(tmp_path / "beyond").given == 1
    assert json.loads((tmp_path / "beyond" / "meta.json").read_text())["erased"] == "x[t+τ] beyond x[t+1]"
    comparison = Comparison.from_checkpoints({"vanilla": twins / "vanilla"}, folder=tmp_path / "cmp", max_sequences=60,
                                             taus=(1, 2), layers=(1,), tokens_root=str(twins / "tokens"),
                                             progress=False, random_init=False)
    again = comparison.intervene(top_k=20, ranks=(4,), positions=2, given=1)  # both controls, conditioned
    pd.testing.assert_frame_equal(again.table, beyond.table)
    assert again.given == 1


@pytest.mark.parametrize("head, checkpoint, message", [
    (3, "mtp", "head 3: mtp has 2 prediction head"),
    (2, "vanilla", "head 2: vanilla has 1 prediction head"),
])
def test_a_head_the_checkpoint_lacks_is_refused(twins, mtp_twin, tmp_path, capsys, head, checkpoint, message):
    argv = ["intervene", "--checkpoints", f"{checkpoint}={twins / checkpoint}", "--head", str(head),
            "--max-sequences", "60", "--top-k", "20", "--tokens-root", str(twins / "tokens"), "--out",
            str(tmp_path / "iv"), "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"forethought: error: {message}")
    assert not (tmp_path / "iv").exists()


def test_a_larger_test_fraction_reads_the_effects_on_more_documents(twins, tmp_path):
    """The erasers are fitted on the rest; the engine keeps a split per fraction, so the probes' split is unchanged."""
    comparison = Comparison.from_checkpoints({"vanilla": twins / "vanilla"}, folder=tmp_path / "cmp", max_sequences=60,
                                             taus=(1,), tokens_root=str(twins / "tokens"), progress=False,
                                             random_init=False)
    probes, wider = concept_split(comparison, 20), concept_split(comparison, 20, test_fraction=0.5)
    clusters = comparison.sample.clusters
    assert len(np.unique(clusters[wider.test])) > len(np.unique(clusters[probes.test]))
    assert not set(clusters[wider.test]) & set(clusters[np.concatenate([wider.train, wider.validation])])
    assert concept_split(comparison, 20) is probes
    results = comparison.intervene(top_k=20, ranks=(1,), positions=2, controls=(RANDOM,), test_fraction=0.5)
    assert set(results.table.query("metric == 'delta_loss'")["n"]) == {2 * len(wider.test)}  # (sequence, t) pairs


def test_a_given_offset_that_leaves_nothing_to_erase_is_refused(twins, tmp_path, capsys):
    argv = ["intervene", "--checkpoints", f"vanilla={twins / 'vanilla'}", "--taus", "2", "--given", "2",
            "--max-sequences", "60", "--top-k", "20", "--tokens-root", str(twins / "tokens"), "--out",
            str(tmp_path / "iv"), "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("forethought: error: given 2: every τ is 2, and x[t+2] beyond itself is "
                                       "nothing; add other taus\n")
    assert not (tmp_path / "iv").exists()


def test_a_concept_that_could_span_the_residual_stream_is_refused(twins, tmp_path):
    config = InterveneConfig(checkpoints={"vanilla": str(twins / "vanilla")}, max_sequences=60, top_k=64,
                             tokens_root=str(twins / "tokens"), out=str(tmp_path / "iv"), progress=False)
    with pytest.raises(ForethoughtError, match=r"top_k 64: the concept's 64 \+ 1 classes can span all 64 residual "
                                               r"dimensions of vanilla, .* choose a top_k below 64"):
        run_intervene(config)
    assert not (tmp_path / "iv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "0"], "ranks must be ≥ 1, got 0"),
    (["--positions", "0"], "positions must be ≥ 1, got 0"),
    (["--taus", "0"], "taus must be offsets ≥ 1, got 0"),
    (["--controls", "random,probe"], "unknown control probe; choose from random, shuffled"),
    (["--head", "0"], "head must be ≥ 1, got 0"),
    (["--given", "-1"], "given must be ≥ 0, got -1"),
    (["--test-fraction", "1"], "test_fraction must be in (0, 1), got 1.0"),
])
def test_bad_intervene_settings_are_one_line_errors(capsys, tmp_path, argv, message):
    assert main(["intervene", "--checkpoints", "a=x", *argv, "--out", str(tmp_path / "iv")]) == 2
    assert capsys.readouterr().err == f"forethought: error: {message}\n"
    assert not (tmp_path / "iv").exists()
