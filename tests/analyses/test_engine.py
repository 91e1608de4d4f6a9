"""The probing engine, checked against a run folder written by the code before it (tests/fixtures/probe-run, made
by tests/fixtures/make_probe_run.py at commit f82ca72): that folder still opens and is reused as it is, a rerun
gives its table, models handed in are never reloaded, and fitted probes can be held."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import forethought as ft
from forethought.analyses.cli import main
from forethought.analyses.engine import Probing, flag_priors
from forethought.analyses.probing import AT_PRIOR
from forethought.analyses.results import CONTROL, read_results
from forethought.models.lm import LMCheckpoint

FIXTURE = Path(__file__).parents[1] / "fixtures" / "probe-run"
# the command the fixture was made with (tests/fixtures/make_probe_run.py), into another folder
PROBE = ("probe --checkpoints tiny=model --corpus corpus.txt --seq-len 16 --max-sequences 60 --kind softmax --lr 3e-2 "
         "--taus 1,2 --max-epochs 8 --batch-sequences 16 --tokens-root tokens --no-progress --out")


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture, as the working directory (its paths are relative)."""
    shutil.copytree(FIXTURE, tmp_path / "probe-run")
    monkeypatch.chdir(tmp_path / "probe-run")
    return tmp_path / "probe-run"


def no_work(monkeypatch) -> None:
    monkeypatch.setattr("forethought.probes.cache.read_layers", lambda *a: pytest.fail("residuals recomputed"))
    monkeypatch.setattr("forethought.probes.store.fit_future_probes", lambda *a, **k: pytest.fail("probes refitted"))


def test_a_run_folder_of_the_code_before_opens_and_is_reused(old_run, monkeypatch):
    stored, _ = read_results("run")
    no_work(monkeypatch)
    comparison = ft.Comparison.from_folder("run", progress=False)
    table = comparison.to_dataframe()
    table = table[table["probe"] != "softmax − unigram"]  # added since (issue 29), with the flag column
    key = ["checkpoint", "layer", "tau", "probe", "metric", "target"]
    mine = table.merge(stored[key], on=key).sort_values(key).reset_index(drop=True)
    theirs = stored.sort_values(key).reset_index(drop=True)
    assert len(stored) == len(table) and mine[theirs.columns].equals(theirs)


def test_a_rerun_gives_the_old_codes_table(old_run):
    """Caches are read through forward hooks on the model since issue 25, not through the bridge as when the fixture
    was made: the same residuals up to the attention kernel's rounding. Every accuracy is the old code's, bit for
    bit; every loss agrees to 1e-5 (measured: 1.0e-6 at most). The engine of issue 24 gave the whole table bit
    for bit."""
    assert main([*PROBE.split(), "run-again"]) == 0
    stored, new = read_results("run")[0], read_results("run-again")[0]
    validation = new["split"] == "validation"  # since issue 26 a run also scores its probes on validation
    assert set(new[validation]["probe"]) == {"softmax"} and validation.sum() == 2 * 3 * 2 * 3
    new = new[~validation & (new["probe"] != "softmax − unigram")].drop(columns="flag").reset_index(drop=True)
    numbers = ["value", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(new.drop(columns=numbers), stored.drop(columns=numbers), check_exact=True)
    accuracies = stored["metric"] != "cross_entropy"
    pd.testing.assert_frame_equal(new[accuracies], stored[accuracies], check_exact=True)
    np.testing.assert_allclose(new[numbers].to_numpy(), stored[numbers].to_numpy(), rtol=0, atol=1e-5)
    assert not (old_run / "run-again" / "random-init").exists()  # the control stayed an object


def test_a_probe_no_better_than_the_class_prior_is_flagged():
    """flag_priors: a probe row is "at the prior" when its paired difference with the unigram is better neither in
    top-1 nor in cross-entropy; beating it on either clears it; other rows get no flag."""
    def row(probe, layer, metric, value, low, high, checkpoint="m"):
        return dict(checkpoint=checkpoint, layer=layer, tau=1, split="test", probe=probe, metric=metric,
                    value=value, ci_low=low, ci_high=high)
    rows = [row("topk", layer, metric, 0.45, 0.4, 0.5) for layer in (0, 1, 2) for metric in ("top1", "cross_entropy")]
    rows += [row("topk − unigram", 0, "top1", 0.0, 0.0, 0.0), row("topk − unigram", 0, "cross_entropy", 0.01, -0.02,
                                                                                              0.04),  # the prior
             row("topk − unigram", 1, "top1", 0.05, 0.02, 0.08), row("topk − unigram", 1, "cross_entropy", 0.1, 0.05,
                                                                                              0.2),  # top-1 beats it
             row("topk − unigram", 2, "top1", 0.01, -0.01, 0.03), row("topk − unigram", 2, "cross_entropy", -0.3,
                                                                                              -0.4, -0.2),  # CE beats
             row("unigram", None, "top1", 0.45, 0.4, 0.5, checkpoint="baseline")]
    flagged = flag_priors(pd.DataFrame(rows), ["topk"])
    probes = flagged[flagged["probe"] == "topk"]
    assert probes.groupby("layer")["flag"].agg(set).to_dict() == {0: {AT_PRIOR}, 1: {""}, 2: {""}}
    assert flagged.loc[flagged["probe"] != "topk", "flag"].isna().all()


def test_models_handed_in_are_never_loaded_again(old_run, monkeypatch):
    checkpoint = LMCheckpoint.load("model")
    monkeypatch.setattr(LMCheckpoint, "load", lambda *a: pytest.fail("a checkpoint was loaded again"))
    monkeypatch.setattr("transformers.PreTrainedModel.from_pretrained", lambda *a, **k: pytest.fail("reloaded"))
    engine = Probing({"tiny": checkpoint}, ft.ProbeSettings(corpus="corpus.txt", seq_len=16, max_sequences=30,
                                                            taus=(1,), max_epochs=1, tokens_root="tokens",
                                                            progress=False), "fresh")
    table = engine.table()
    assert set(table["checkpoint"]) == {"tiny", CONTROL, "baseline"}
    assert engine.checkpoint("tiny") is checkpoint and sum(p.numel() for p in checkpoint.model.parameters()) > 0
    assert [n for n, _ in checkpoint.model.named_parameters()][0] == "transformer.wte.weight"  # not rewrapped


def test_a_held_probe_reproduces_its_held_out_scores(old_run):
    comparison = ft.Comparison.from_folder("run", progress=False)
    probe = comparison.probe("tiny", 2, 1)  # the old folder kept scores only: refitted, alike
    scores = comparison.scores("tiny").values[(2, 1)]  # [examples, (top-1, top-5, cross-entropy)]
    split, cache = comparison.split(comparison.settings.probe_config("cpu")), comparison.cache("tiny")
    positions = comparison.tokens.shape[1] - max(comparison.taus)
    h = torch.from_numpy(cache.read(split.test, [2])[0][:, :positions].astype(np.float32))  # [n, positions, d]
    predicted = probe.classes[probe.predict(h).argmax(-1).numpy()]
    truth = comparison.tokens[split.test, 1 : positions + 1]
    np.testing.assert_array_equal((predicted == truth).reshape(-1), scores[:, 0])
    assert list((old_run / "run" / "scores" / "tiny").glob("softmax-*.safetensors"))  # now kept beside the scores
    shown = comparison.predictions("tiny", 2, 1, n=4)
    assert len(shown) == 4 and list(shown.columns) == ["sequence", "t", "context", "x[t+1]", "probe top-5",
                                                      "model's x̂[t+1]"]
    assert all(len(row.split(", ")) == 5 for row in shown["probe top-5"])


def test_probe_show_prints_tokens_as_text(old_run, capsys):
    assert main([*PROBE.split(), "run", "--show", "3"]) == 0  # the same run: reused, then shown
    printed = capsys.readouterr().out
    assert "softmax probes of tiny at layer" in printed and "probe top-5" in printed and "'w" in printed
