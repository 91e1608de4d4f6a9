"""forethought probe: checkpoints + control + baselines in one tidy table, cached work reused, bad input named."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from forethought.analyses import engine
from forethought.analyses.cli import main
from forethought.analyses.compare import Comparison
from forethought.analyses.precache import MATCHED, PRECACHE, PrecacheConfig, run_precache
from forethought.analyses.probe import ProbeConfig, ProbeResults, run_probe
from forethought.analyses.probing import AT_PRIOR
from forethought.analyses.results import CONTROL
from forethought.core.errors import ForethoughtError
from forethought.models.heldout import heldout_sample, token_losses
from forethought.models.lm import LMCheckpoint
from forethought.models.tasks.text import TextData
from forethought.models.twins import loss_matched
from forethought.probes.cache import ResidualCache


def settings(twins, out, **overrides) -> ProbeConfig:
    values = dict(checkpoints={"vanilla": str(twins / "vanilla"), "myopic": str(twins / "myopic")}, taus=(1, 2),
                  kind="topk", top_k=40, max_sequences=60, max_epochs=3, lr=1e-2, tokens_root=str(twins / "tokens"),
                  out=str(out), progress=False)
    return ProbeConfig(**{**values, **overrides})


def test_probe_table_figure_and_reuse(twins, tmp_path, monkeypatch):
    results = run_probe(settings(twins, tmp_path / "probe"))
    table = results.to_dataframe()
    assert set(table["checkpoint"]) == {"vanilla", "myopic", CONTROL, "baseline"}
    probed = table[table["layer"].notna() & (table["probe"] == "topk") & (table["split"] == "test")]
    assert len(probed) == 3 * 3 * 2 * 3  # checkpoints × layers 0–2 × τ ∈ {1, 2} × (top1, top5, cross_entropy)
    validation = table[table["split"] == "validation"]  # the same probes on their validation sequences
    assert len(validation) == len(probed) and set(validation["probe"]) == {"topk"}
    chosen = validation[(validation["checkpoint"] == "myopic") & (validation["metric"] == "top1")]
    assert results.best_layers("myopic") == {  # chosen on validation, never on the test examples
        tau: int(rows.loc[rows["value"].idxmax(), "layer"]) for tau, rows in chosen.groupby("tau")}
    assert (table["probe"] == "topk − skip-bigram").sum() == len(probed)  # the same grid, paired with the counts
    assert (table["probe"] == "topk − unigram").sum() == len(probed)  # and with the class prior
    assert set(table.loc[table.index.isin(probed.index), "flag"]) <= {"", AT_PRIOR}  # every probe row flagged or not
    assert table.loc[~table.index.isin(probed.index) & (table["split"] == "test"), "flag"].isna().all()
    lens = table[table["probe"] == "logit lens"]
    assert len(lens) == 3 * 3 * 3 and set(lens["tau"]) == {1}  # checkpoints × layers × metrics, τ = 1 only
    assert set(table.loc[table["layer"].isna(), "probe"]) == {"unigram", "skip-bigram"}
    top1 = results.accuracy()
    assert list(top1.columns) == [0, 1, 2] and ((top1 >= 0) & (top1 <= 1)).all().all()
    assert {trace.name for trace in results.figure().data} <= {"τ = 1", "τ = 2", "logit lens (τ = 1)",
                                                                "at the prior (no better than the majority class)"}
    assert (tmp_path / "probe" / "figures" / "probe_topk_top1.html").exists()
    assert ProbeResults.from_folder(tmp_path / "probe").table.equals(table)
    meta = json.loads((tmp_path / "probe" / "meta.json").read_text())
    steps = [f"{step} {name}" for name in ("vanilla", "myopic", CONTROL) for step in ("caching", "topk", "logit lens")]
    assert sorted(meta["seconds"]) == sorted(steps) and all(seconds >= 0 for seconds in meta["seconds"].values())
    assert meta["threads"] == torch.get_num_threads()  # a run's numbers may depend on it: recorded
    assert set(meta["parameters"]) == {"vanilla", "myopic", CONTROL} and meta["parameters"]["vanilla"] > 0
    split = meta["probe_split"]  # carried with the results
    assert len(split["classes"]) == 40 and not set(split["train"]) & set(split["test"])
    assert set(split["validation"]) <= set(split["train"]) and len(split["train"]) + len(split["test"]) == 60
    n_examples = table.loc[table["probe"].isin(["topk", "skip-bigram"]) & (table["split"] == "test"), "n"].unique()
    assert len(n_examples) == 1 and n_examples[0] % len(split["test"]) == 0  # probes and baselines: the same examples
    skip_bigram = table[(table["probe"] == "skip-bigram") & (table["metric"] == "top1")].set_index("tau")["value"]
    beyond = results.beyond_counts("myopic")
    for (layer, tau), row in beyond.iterrows():  # paired means: exactly probe − baseline
        assert row["value"] == pytest.approx(top1.loc[("myopic", tau), layer] - skip_bigram[tau], abs=1e-12)
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    reading = results.reading()
    assert "myopic" not in reading and "vanilla: held-out top1 of the probe at its best layer" in reading
    for tau in (1, 2):  # the strongest baseline is named: the best of unigram, skip-bigram and (τ = 1) the lens
        candidates = results.baseline_values(tau)
        assert set(candidates) == ({"unigram", "skip-bigram", "logit lens"} if tau == 1 else {"unigram", "skip-bigram"})
        strongest = max(candidates, key=lambda name: candidates[name][0])
        assert re.search(rf"τ = {tau}: best layer \d: [\d.]+, (above|below|not separable from) the strongest "
                         rf"baseline, {strongest}", reading), reading
    monkeypatch.setattr("forethought.probes.cache.read_layers", lambda *a: pytest.fail("cache rebuilt"))
    monkeypatch.setattr("forethought.probes.store.fit_future_probes", lambda *a, **k: pytest.fail("refitted"))
    again = run_probe(settings(twins, tmp_path / "probe"))
    assert again.table.equals(table)  # read back from the stored scores
    for name in ("config.json", "meta.json"):  # as run folders were written before list settings were typed
        path = tmp_path / "probe" / name
        saved = json.loads(path.read_text())
        config = saved.get("config", saved)
        config.update(taus="1,2", layers="all", checkpoints=f"vanilla={twins / 'vanilla'},myopic={twins / 'myopic'}")
        path.write_text(json.dumps(saved))
    assert ProbeResults.from_folder(tmp_path / "probe").config == results.config
    assert run_probe(settings(twins, tmp_path / "probe")).table.equals(table)  # the same run, still
    monkeypatch.undo()
    fresh = run_probe(settings(twins, tmp_path / "fresh"))  # the same caches, seeds and fits, from scratch
    assert fresh.table.equals(table)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoints", "a=x,a=y"],
         "probe: argument --checkpoints: two checkpoints are named 'a'; name them NAME=PATH"),
        (["--checkpoints", "x", "--taus", "0,1"], "taus must be offsets ≥ 1, got 0,1"),
        (["--checkpoints", "x", "--taus", "one"],
         "probe: argument --taus: taus must be comma-separated integers, got 'one'"),
        (["--checkpoints", "x", "--kind", "quadratic"],
         "unknown probe kind 'quadratic'; choose one of softmax, topk, lens, mlp"),
        ([], "give --checkpoints (name → folder)"),
    ],
)
def test_bad_probe_settings_are_one_line_errors(capsys, tmp_path, argv, message):
    assert main(["probe", *argv, "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == f"forethought: error: {message}\n"
    assert not (tmp_path / "p").exists()


def test_layers_that_do_not_exist_are_named(twins, tmp_path, capsys):
    assert main(["probe", "--checkpoints", str(twins / "vanilla"), "--layers", "1,7", "--out", str(tmp_path / "p"),
                 "--tokens-root", str(twins / "tokens")]) == 2
    assert "layers [7] out of range: the checkpoints have residual layers 0 … 2" in capsys.readouterr().err


def test_precache_estimates_are_paired_differences(twins, tmp_path, monkeypatch):
    draws = []  # the loss match and the probes read one sample, drawn once
    monkeypatch.setattr(engine, "heldout_sample", lambda *args: draws.append(args) or heldout_sample(*args))
    config = PrecacheConfig(vanilla=str(twins / "vanilla"), myopic=str(twins / "myopic"), taus=(1, 2), kind="topk",
                            top_k=40, max_sequences=60, max_epochs=3, lr=1e-2, share_sequences=4, random_init=False,
                            tokens_root=str(twins / "tokens"), out=str(tmp_path / "pre"), progress=False)
    results = run_precache(config)
    assert len(draws) == 1
    probed = results.table[(results.table["metric"] == "top1") & (results.table["probe"] == "topk")
                           & (results.table["split"] == "test")]
    vanilla, myopic = (probed[probed["checkpoint"] == name].pivot(index="layer", columns="tau", values="value")
                       for name in ("vanilla", "myopic"))
    np.testing.assert_allclose(results.precaching(), vanilla - myopic, atol=1e-12)
    assert results.breadcrumbs().equals(myopic)
    p = results.table[results.table["checkpoint"] == PRECACHE]
    assert (p["ci_low"] <= p["value"]).all() and (p["value"] <= p["ci_high"]).all()
    shares = results.table[results.table["metric"].isin(["future_squared_share", "own_future_cosine"])]
    assert set(shares["checkpoint"]) == {"vanilla", "myopic"} and len(shares) == 2 * 2 * 3  # twins × metrics × layers
    # the loss-matched estimate: the vanilla run's saved checkpoint nearest the myopic twin's held-out loss
    match = json.loads((tmp_path / "pre" / "meta.json").read_text())["loss_match"]
    by_step = {int(step): loss for step, loss in match["vanilla_losses_by_step"].items()}
    assert sorted(by_step) == [10, 20, 30, 40] and by_step[10] > by_step[40]  # the run learned
    assert match["step"] == min(by_step, key=lambda step: abs(by_step[step] - match["myopic_loss"]))
    losses = results.losses()["value"]
    assert losses[MATCHED] == pytest.approx(by_step[match["step"]]) and losses["vanilla"] == pytest.approx(by_step[40])
    assert losses["myopic"] == pytest.approx(match["myopic_loss"])
    # here the myopic twin's loss is nearest the vanilla twin's own last checkpoint: P_matched is P
    assert match["step"] == 40 and results.precaching(matched=True).equals(results.precaching())
    assert {p.name for p in (tmp_path / "pre" / "figures").glob("*.html")} == {
        "precache_topk_top1.html", "precache_topk_heatmap.html", "precache_topk_heatmap_matched.html"}
    assert PRECACHE not in results.accuracy().index.get_level_values("checkpoint")
    assert "P_matched (top-1, that checkpoint − myopic)" in results.summary()
    assert Comparison.from_folder(tmp_path / "pre", progress=False).names == [
        "vanilla",
        "myopic",
    ]  # as the run named them (the matched checkpoint is the vanilla twin itself here)
    with pytest.raises(
        ForethoughtError, match="settings this ProbeResults does not know .*myopic.*; run its command again"
    ):
        ProbeResults.from_folder(tmp_path / "pre")  # a precache run is not a probe run


def test_the_multi_token_bracket_adds_its_paired_estimates(twins, mtp_twin, tmp_path):
    config = PrecacheConfig(vanilla=str(twins / "vanilla"), myopic=str(twins / "myopic"), mtp=str(mtp_twin),
                            taus=(1, 2), layers=(0, 2), max_sequences=60, max_epochs=2, share_sequences=4,
                            random_init=False, tokens_root=str(twins / "tokens"), out=str(tmp_path / "pre"),
                            progress=False)
    results = run_precache(config)
    top1 = results.table[(results.table["metric"] == "top1") & (results.table["split"] == "test")
                         & (results.table["probe"] == "softmax")]
    probed = {name: top1[top1["checkpoint"] == name].pivot(index="layer", columns="tau", values="value")
              for name in top1["checkpoint"].unique()}
    np.testing.assert_allclose(results.precaching(beyond=True), probed["mtp"] - probed["vanilla"], atol=1e-12)
    matched = results.mtp_matched()  # the better next-token model's run, at the other's loss
    losses = results.losses()["value"]
    record = json.loads((tmp_path / "pre" / "meta.json").read_text())["loss_match_mtp"][matched]
    if matched == "mtp at the vanilla loss":
        assert losses["mtp"] <= losses["vanilla"] and record["vanilla_loss"] == pytest.approx(losses["vanilla"])
        expected = probed.get(matched, probed["mtp"]) - probed["vanilla"]
    else:
        assert losses["mtp"] > losses["vanilla"] and record["mtp_loss"] == pytest.approx(losses["mtp"])
        expected = probed["mtp"] - probed.get(matched, probed["vanilla"])
    np.testing.assert_allclose(results.precaching(matched=True, beyond=True), expected, atol=1e-12)
    assert losses[matched] == pytest.approx(record[f"{matched.split()[0]}_loss"])
    assert {"precache_softmax_heatmap_mtp.html", "precache_softmax_heatmap_mtp_matched.html"} <= {
        p.name for p in (tmp_path / "pre" / "figures").glob("*.html")}
    assert "the multi-token twin (positive control)" in results.summary()
    assert results.heatmap(beyond=True).layout.title.text.startswith("P_mtp = top1(mtp) − top1(vanilla)")
    assert matched in results.heatmap(matched=True, beyond=True).layout.title.text
    shares = results.table[results.table["metric"] == "future_squared_share"]
    assert set(shares["checkpoint"]) == {"vanilla", "myopic", "mtp"}


def test_the_multi_token_twin_must_be_one(twins, mtp_twin, tmp_path, capsys):
    common = ["--tokens-root", str(twins / "tokens"), "--out", str(tmp_path / "pre")]
    for mtp, message in ((twins / "myopic", "--mtp .* was trained myopically"),
                         (twins / "vanilla", "--mtp must be a multi-token twin of the vanilla one")):
        assert main(["precache", "--vanilla", str(twins / "vanilla"), "--myopic", str(twins / "myopic"),
                     "--mtp", str(mtp), *common]) == 2
        assert re.search(message, capsys.readouterr().err) and not (tmp_path / "pre").exists()


def test_the_loss_match_finds_a_checkpoint_of_equal_loss(twins):
    """A 'myopic twin' that is the vanilla run's own step-20 checkpoint is matched to exactly that step."""
    vanilla = LMCheckpoint.load(twins / "vanilla")
    planted = LMCheckpoint.load(twins / "vanilla" / "checkpoints" / "step-0000020")
    tokens = torch.from_numpy(heldout_sample(vanilla.data(), vanilla.tokenizer, twins / "tokens", 20, seed=0).tokens)
    match = loss_matched(vanilla, planted, tokens, batch_size=8)
    assert match.step == 20 and match.source.endswith("step-0000020")
    np.testing.assert_array_equal(match.losses, match.myopic_losses)
    assert sorted(match.vanilla_losses) == [10, 20, 30, 40]
    assert match.record()["vanilla_losses_by_step"]["40"] == pytest.approx(token_losses(vanilla.model, tokens).mean())


def test_a_loss_match_reuses_the_losses_an_earlier_one_measured(twins, monkeypatch):
    """The bracket's second match (the vanilla run searched again) measures nothing the first one measured, and
    finds the same checkpoint as when it measures everything; ``given_losses`` is the checkpoint given."""
    vanilla = LMCheckpoint.load(twins / "vanilla")
    myopic = LMCheckpoint.load(twins / "myopic")
    tokens = torch.from_numpy(heldout_sample(vanilla.data(), vanilla.tokenizer, twins / "tokens", 20, seed=0).tokens)
    first = loss_matched(vanilla, myopic, tokens, batch_size=8)
    np.testing.assert_array_equal(first.given_losses, token_losses(vanilla.model, tokens))
    monkeypatch.setattr("forethought.models.twins.token_losses", lambda *a, **k: pytest.fail("measured again"))
    again = loss_matched(vanilla, myopic, tokens, batch_size=8, measured=first.measured)
    assert (again.step, again.source, again.sources) == (first.step, first.source, first.sources)
    np.testing.assert_array_equal(again.losses, first.losses)
    with pytest.raises(pytest.fail.Exception, match="measured again"):  # the test's stand-in is the one measuring
        loss_matched(vanilla, myopic, tokens, batch_size=8)


def test_precache_refuses_swapped_twins(twins, tmp_path, capsys):
    assert main(["precache", "--vanilla", str(twins / "myopic"), "--myopic", str(twins / "vanilla"),
                 "--out", str(tmp_path / "pre"), "--tokens-root", str(twins / "tokens")]) == 2
    assert "was trained myopically" in capsys.readouterr().err and not (tmp_path / "pre").exists()
    assert main(["precache", "--vanilla", str(twins / "vanilla"), "--out", str(tmp_path / "pre")]) == 2
    assert "give the twins: --vanilla and --myopic" in capsys.readouterr().err


def test_the_bos_policy_is_recorded_and_the_probes_see_exactly_those_tokens(llama_folder, llama_text, tmp_path):
    common = dict(corpus=str(llama_text), layout="packed", seq_len=12, taus=(1, 2), kind="topk", top_k=20,
                  max_sequences=40, max_epochs=1, random_init=False, tokens_root=str(tmp_path / "tokens"),
                  progress=False)
    bos = LMCheckpoint.load(llama_folder).tokenizer.bos_token_id
    for prepend_bos in (False, True):
        out = tmp_path / f"bos-{prepend_bos}"
        checkpoints = {"llama": str(llama_folder)}
        run_probe(ProbeConfig(checkpoints=checkpoints, prepend_bos=prepend_bos, out=str(out), **common))
        tokenization = json.loads((out / "meta.json").read_text())["tokenization"]
        assert tokenization["prepend_bos"] is prepend_bos and tokenization["bos_token_id"] == bos
        assert tokenization["seq_len"] == 12 and tokenization["special_tokens_added_by_tokenizer"] is False
        tokens = ResidualCache.open(out / "caches" / "llama").tokens
        assert tokens.shape[1] == 12 and (tokens[:, 0] == bos).all() == prepend_bos
        assert (tokens[:, 1:] != bos).all()  # the text itself never holds it
    with_bos = ResidualCache.open(tmp_path / "bos-True" / "caches" / "llama").tokens
    text = heldout_sample(TextData(corpus=str(llama_text), layout="packed", seq_len=11),
                          LMCheckpoint.load(llama_folder).tokenizer, tmp_path / "tokens", 40, seed=0).tokens
    np.testing.assert_array_equal(with_bos[:, 1:], text)  # BOS, then the sample of 11-token texts


def test_checkpoints_with_other_special_tokens_are_refused(llama_folder, llama_text, tmp_path, capsys):
    other = tmp_path / "other-bos"
    shutil.copytree(llama_folder, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.bos_token = "<|endoftext|>"  # the same vocabulary, another BOS
    tokenizer.save_pretrained(other)
    assert main(["probe", "--checkpoints", f"a={llama_folder},b={other}", "--corpus", str(llama_text),
                 "--out", str(tmp_path / "p"), "--tokens-root", str(tmp_path / "tokens")]) == 2
    assert "checkpoint 'b' uses another tokenizer than 'a': they cannot be probed on the same tokens" in \
        capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_nonlinear_probes_sit_beside_the_linear_ones_with_their_paired_difference(twins, tmp_path, capsys):
    results = run_probe(settings(twins, tmp_path / "probe", nonlinear=True, hidden=16, random_init=False))
    table = results.table[results.table["split"] == "test"]
    top1 = {kind: table[(table["probe"] == kind) & (table["metric"] == "top1")].set_index(["checkpoint", "layer",
                                                                                           "tau"])["value"]
            for kind in ("topk", "mlp", "mlp − topk")}
    assert len(top1["mlp"]) == len(top1["topk"]) == 2 * 3 * 2  # checkpoints × layers × τ
    pd.testing.assert_series_equal(top1["mlp − topk"], top1["mlp"] - top1["topk"], check_names=False, atol=1e-12)
    validation = results.table[results.table["split"] == "validation"]
    assert set(validation["probe"]) == {"topk", "mlp"}
    assert main(["probe", "--checkpoints", str(twins / "vanilla"), "--nonlinear", "--out", str(tmp_path / "x")]) == 2
    assert "add --kind topk" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_held_out_sample_of_few_documents_is_warned_about(twins, tmp_path, caplog):
    """Intervals resample documents: a split whose test sequences come from a handful of them says so."""
    for max_sequences in (40, 400):
        comparison = Comparison.from_checkpoints({"vanilla": str(twins / "vanilla")}, tmp_path / str(max_sequences),
                                                 max_sequences=max_sequences, tokens_root=str(twins / "tokens"),
                                                 random_init=False, progress=False)
        caplog.clear()
        with caplog.at_level("WARNING"):
            split = comparison.split(comparison.settings.probe_config("cpu"))
        documents = len(np.unique(comparison.sample.clusters[split.test]))
        assert (documents < engine.FEW_DOCUMENTS) == (max_sequences == 40), documents  # both sides exercised
        assert (f"come from {documents} held-out documents only" in caplog.text) == (documents < engine.FEW_DOCUMENTS)
