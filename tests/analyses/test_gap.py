"""The myopia gap and the future-gradient share, end to end on a tiny pair."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from forethought.analyses.cli import main
from forethought.analyses.compare import Comparison
from forethought.analyses.gap import GAP, GapConfig, GapResults, run_gap
from forethought.analyses.precache import PrecacheConfig, run_precache
from forethought.core.errors import ForethoughtError
from forethought.core.files import DIGESTS_FILE
from forethought.models.checkpoint import latest_checkpoint, load_training_state
from forethought.models.families import non_embedding_parameters
from forethought.models.gpt2 import build_lm, gpt2_config
from forethought.models.lm import LMCheckpoint, LMTrainConfig, train_lm
from forethought.models.twins import TWINS, check_twins


def test_gap_end_to_end_on_a_tiny_pair(twins, tmp_path):
    config = GapConfig(vanilla=str(twins / "vanilla"), myopic=str(twins / "myopic"), max_sequences=40,
                       share_sequences=8, tokens_root=str(twins / "tokens"), out=str(tmp_path / "gap"), progress=False)
    results = run_gap(config)
    losses = results.losses()
    assert losses.loc[["vanilla", "myopic"], "value"].lt(np.log(50257) - 2).all()  # both learned something
    assert losses.loc[GAP, "value"] == pytest.approx(losses.loc["myopic", "value"] - losses.loc["vanilla", "value"])
    assert (losses["ci_low"] <= losses["value"]).all() and (losses["value"] <= losses["ci_high"]).all()
    by_position = results.by_position()
    assert list(by_position.index) == list(range(31))  # T − 1 predicted positions
    np.testing.assert_allclose(by_position[GAP], by_position["myopic"] - by_position["vanilla"], atol=1e-9)
    shares = results.shares()
    assert list(shares.index) == [0, 1, 2] and shares.loc[2].abs().max() < 1e-6
    assert ((shares.loc[[0, 1]] > 0) & (shares.loc[[0, 1]] < 1)).all().all()
    reloaded = GapResults.from_folder(tmp_path / "gap")
    assert reloaded.table.equals(results.table) and reloaded.config == config
    sizes = json.loads((tmp_path / "gap" / "meta.json").read_text())["parameters"]  # `trend` reads them
    expected = non_embedding_parameters(LMCheckpoint.load(twins / "vanilla").model)
    assert sizes == {"vanilla": expected, "myopic": expected} and expected > 0
    for twin in ("vanilla", "myopic"):  # the twins' own training curves, read from their training state
        history = load_training_state(latest_checkpoint(twins / twin))["history"]
        assert reloaded.histories[twin] == history and [r["step"] for r in history] == list(range(1, 41))
    assert {p.name for p in (tmp_path / "gap" / "figures").glob("*.html")} == {
        "gap_loss_by_position.html", "gap_future_gradient_share.html", "gap_training_loss.html"}


def test_twins_that_do_not_match_are_refused(twins, tmp_path, capsys):
    def gap(*argv: str) -> str:
        capsys.readouterr()
        assert main(["gap", *argv, "--tokens-root", str(twins / "tokens"), "--out", str(tmp_path / "g"),
                     "--no-progress"]) == 2
        return capsys.readouterr().err

    assert "was trained myopically" in gap("--vanilla", str(twins / "myopic"), "--myopic", str(twins / "vanilla"))
    other = LMTrainConfig.from_settings(
        corpus="embedded", max_documents=2000, model="gpt2-micro", seq_len=32, steps=1,
                          batch_size=4, tokens_root=str(twins / "tokens"), out=str(tmp_path / "other"),
                          progress=False)
    train_lm(other)
    assert "the twins were trained on different data" in gap("--vanilla", str(tmp_path / "other"),
                                                              "--myopic", str(twins / "myopic"))
    other_lr = LMTrainConfig.from_settings(
        corpus="embedded", max_documents=3000, model="gpt2-micro", seq_len=32, steps=2, batch_size=16, lr=1e-3,
        tokens_root=str(twins / "tokens"), out=str(tmp_path / "lr"), myopic=True, progress=False)
    train_lm(other_lr)
    assert "trained with other settings (vanilla → myopic: steps: 40 → 2, lr: 0.005 → 0.001" in gap(
        "--vanilla", str(twins / "vanilla"), "--myopic", str(tmp_path / "lr"))
    early = tmp_path / "early" / "checkpoints" / "step-0000020"  # the twin's weights, filed as an earlier step
    shutil.copytree(twins / "myopic" / "checkpoints" / "step-0000040", early)
    assert "not at the same training step (vanilla at step 40 of 40, myopic at step 20 of 40)" in gap(
        "--vanilla", str(twins / "vanilla"), "--myopic", str(early))
    older = tmp_path / "older" / "checkpoints" / "step-0000040"  # a twin made before --objective existed: matches
    shutil.copytree(twins / "myopic" / "checkpoints" / "step-0000040", older)
    (older / DIGESTS_FILE).unlink()  # older runs recorded no digests either
    description = json.loads((older / "forethought.json").read_text())
    del description["train_config"]["objective"]
    (older / "forethought.json").write_text(json.dumps(description))
    check_twins(LMCheckpoint.load(twins / "vanilla"), LMCheckpoint.load(older))
    description["train_config"]["objective"] = "mtp:2"  # … and a multi-token one does not
    (older / "forethought.json").write_text(json.dumps(description))
    with pytest.raises(ForethoughtError, match="objective: 'next-token' → 'mtp:2'"):
        check_twins(LMCheckpoint.load(twins / "vanilla"), LMCheckpoint.load(older))
    assert "give --vanilla and/or --myopic checkpoints" in gap()
    assert f"checkpoint folder {tmp_path / 'nowhere'} does not exist" in gap(  # a path: not looked for on the hub
        "--vanilla", str(tmp_path / "nowhere")
    )
    assert "nowhere is not a folder, and the Hugging Face hub cannot be reached" in gap("--vanilla", "nowhere")
    assert not (tmp_path / "g").exists()


def test_single_checkpoint_gives_its_share_alone(twins, tmp_path):
    results = run_gap(GapConfig(vanilla=str(twins / "vanilla"), share_sequences=4, max_sequences=8,
                                tokens_root=str(twins / "tokens"), out=str(tmp_path / "one"), progress=False))
    assert list(results.shares().columns) == ["vanilla"] and GAP not in results.losses().index
    assert list(results.histories) == ["vanilla"]


def test_a_model_trained_elsewhere_is_read_on_the_embedded_corpus_saying_so(twins, tmp_path, caplog):
    """Like pretrained GPT-2 from the hub: weights with no tokenizer or data record beside them."""
    build_lm(gpt2_config(n_layer=2, d_model=16, n_head=2), seed=0).save_pretrained(tmp_path / "elsewhere")
    common = dict(vanilla=str(tmp_path / "elsewhere"), seq_len=32, max_sequences=8, share_sequences=4,
                  tokens_root=str(twins / "tokens"), progress=False)
    with caplog.at_level("WARNING"):
        fallback = run_gap(GapConfig(**common, out=str(tmp_path / "fallback")))
    assert "record no training data (trained elsewhere): held-out text from the embedded corpus" in caplog.text
    chosen = run_gap(GapConfig(**common, corpus="embedded", out=str(tmp_path / "chosen")))
    assert chosen.shares()["vanilla"].between(0, 1).all()
    pd.testing.assert_frame_equal(fallback.losses(), chosen.losses())  # the same held-out text as asking for it


def test_a_llama_gets_its_losses_and_its_future_gradient_share(llama_folder, llama_text, tmp_path):
    results = run_gap(GapConfig(vanilla=str(llama_folder), corpus=str(llama_text), layout="packed", seq_len=16,
                                max_sequences=8, tokens_root=str(tmp_path / "tokens"), out=str(tmp_path / "g"),
                                progress=False))
    shares, cosines = results.shares()["vanilla"], results.shares("own_future_cosine")["vanilla"]
    assert results.losses().loc["vanilla", "value"] > 0 and len(shares) == 3  # residual layers 0 … 2
    assert shares.between(0, 1).all() and shares.iloc[0] > 0  # later positions' losses reach the embeddings
    assert shares.iloc[-1] == 0 and cosines.iloc[:-1].between(-1, 1).all()  # the last layer: no future part
    assert set(results.figures()) == {"gap_loss_by_position", "gap_future_gradient_share"}


def test_fine_tuned_llama_twins_go_through_gap_precache_and_comparison(llama_folder, llama_text, tmp_path):
    """A pretrained Llama fine-tuned vanilla and myopically (bfloat16, gradient checkpointing): the twins are
    accepted downstream, as GPT-2 twins are."""
    twins = {}
    for name in TWINS:
        config = LMTrainConfig.from_settings(
            corpus=str(llama_text), layout="packed", seq_len=12, model=str(llama_folder), from_pretrained=True,
            tokenizer=str(llama_folder), myopic=name == "myopic", steps=3, batch_size=8, lr=1e-3, precision="bfloat16",
            gradient_checkpointing=True, eval_every=1, eval_batches=1, tokens_root=str(tmp_path / "tokens"),
            out=str(tmp_path / name), progress=False)
        twins[name] = str(train_lm(config).checkpoint.parent.parent)
    common = dict(max_sequences=16, share_sequences=4, tokens_root=str(tmp_path / "tokens"), progress=False)
    gap = run_gap(GapConfig(**twins, out=str(tmp_path / "gap"), **common))
    assert set(gap.losses().index) == {*TWINS, GAP} and set(gap.histories) == set(TWINS)
    assert len(gap.shares()) == 3 and gap.shares().loc[0].gt(0).all()
    precache = run_precache(PrecacheConfig(**twins, taus=(1, 2), kind="topk", top_k=20, max_epochs=2,
                                           random_init=False, out=str(tmp_path / "pre"), **common))
    assert precache.precaching().shape == (3, 2)
    comparison = Comparison.from_checkpoints(twins, folder=tmp_path / "compare", taus=(1,), kind="topk", top_k=20,
                                             max_sequences=16, max_epochs=2, tokens_root=str(tmp_path / "tokens"),
                                             progress=False)
    assert {"vanilla", "myopic"} <= set(comparison.to_dataframe()["checkpoint"])


def test_a_mixed_heldout_text_is_sampled_by_text_and_reported_per_text(twins, tmp_path, monkeypatch):
    """Documents labelled as two texts (even and odd ones): the sample holds both in proportion, the gap is
    reported per text beside the whole sample (which is their token-weighted mean), and meta.json says so."""
    monkeypatch.setattr("forethought.models.heldout.document_texts",
                        lambda source, n: np.where(np.arange(n) % 2, "odd", "even").astype(object))
    config = GapConfig(vanilla=str(twins / "vanilla"), myopic=str(twins / "myopic"), max_sequences=40,
                       share_sequences=8, tokens_root=str(twins / "tokens"), out=str(tmp_path / "gap"), progress=False)
    results = run_gap(config)
    by_text = results.losses_by_text()
    assert by_text.index[0] == "test" and set(by_text.index[1:]) == {"test: even", "test: odd"}
    rows = results.by_text.set_index(["split", "checkpoint"])
    for name in ("vanilla", "myopic", GAP):
        weights = rows.loc[[("test: even", name), ("test: odd", name)], "n"].to_numpy(float)
        texts = by_text.loc[["test: even", "test: odd"], name]
        assert by_text.loc["test", name] == pytest.approx(np.average(texts, weights=weights))
    assert (results.by_text["ci_low"] <= results.by_text["value"]).all()
    heldout = json.loads((tmp_path / "gap" / "meta.json").read_text())["heldout"]
    assert heldout["sequences"] == 40 and set(heldout["by_text"]) == {"even", "odd"}
    assert abs(heldout["by_text"]["even"]["sequences"] - 20) <= 4  # about half each: the documents alternate
    assert GapResults.from_folder(tmp_path / "gap").by_text.equals(results.by_text)
    assert "per text: " in results.summary() and "even vanilla " in results.summary()
