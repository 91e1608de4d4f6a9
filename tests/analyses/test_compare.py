"""Comparison: lazy, cached probe results of named checkpoints; its figure's menus; bad input named, work kept."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

import forethought.analyses.compare
import forethought.probes.cache
import forethought.probes.store
from forethought.analyses.cli import main
from forethought.analyses.compare import Comparison
from forethought.analyses.plots import METRIC_TITLES
from forethought.analyses.probe import ProbeConfig, run_probe
from forethought.analyses.probing import LOGIT_LENS
from forethought.analyses.results import CONTROL
from forethought.core.errors import ForethoughtError
from forethought.models.lm import LMCheckpoint, LMTrainConfig, train_lm

SETTINGS = dict(taus=(1, 2), kind="topk", top_k=40, max_sequences=60, max_epochs=3, progress=False)
KEY = ["checkpoint", "probe", "target", "layer", "tau", "metric", "split"]


@pytest.fixture(scope="module")
def probed(twins, tmp_path_factory):
    """A ``forethought probe`` run over the twins: the folder a Comparison picks up."""
    out = tmp_path_factory.mktemp("compare") / "probe"
    results = run_probe(ProbeConfig(checkpoints={"vanilla": str(twins / "vanilla"), "myopic": str(twins / "myopic")},
                                    tokens_root=str(twins / "tokens"), out=str(out), **SETTINGS))
    return out, results.to_dataframe()


@pytest.fixture
def comparison(probed):
    return Comparison.from_folder(probed[0], progress=False)


def no_work(monkeypatch) -> None:
    """Make any residual caching or probe fitting fail the test."""
    monkeypatch.setattr("forethought.probes.cache.read_layers", lambda *a: pytest.fail("cached again"))
    monkeypatch.setattr("forethought.probes.store.fit_future_probes", lambda *a, **k: pytest.fail("fitted again"))


def rows(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(KEY).reset_index(drop=True)


def test_a_probe_run_is_reused_and_nothing_is_computed_twice(probed, comparison, twins, monkeypatch):
    out, probe_table = probed
    probe_table = probe_table[~probe_table["probe"].str.endswith(" − skip-bigram")  # the probe run's own reading
                              & (probe_table["split"] == "test")]  # and its probes' validation scores
    no_work(monkeypatch)
    assert "computed: nothing yet" in repr(comparison)
    table = comparison.to_dataframe()
    assert set(table["checkpoint"]) == {"vanilla", "myopic", CONTROL, "baseline"}
    same = table.merge(probe_table[KEY], on=KEY)  # the probe run's rows (the comparison adds the lens's baselines)
    assert len(same) == len(probe_table) and rows(same).equals(rows(probe_table))
    monkeypatch.setattr("forethought.analyses.engine.probe_scores", lambda *a: pytest.fail("scores were read again"))
    monkeypatch.setattr("forethought.analyses.engine.score_rows", lambda *a, **k: pytest.fail("CIs recomputed"))
    assert comparison.to_dataframe().equals(table)  # the second call is served from memory
    monkeypatch.undo()
    no_work(monkeypatch)
    rebuilt = Comparison.from_checkpoints({"vanilla": twins / "vanilla", "myopic": twins / "myopic"}, folder=out,
                                          tokens_root=str(twins / "tokens"), **SETTINGS)
    assert rebuilt.to_dataframe().equals(table)  # a new object in a new session: from disk


def test_repr_says_what_is_computed_and_where(comparison):
    assert comparison._repr_html_().count("<td>·</td>") == 3 and "<td>✓</td>" not in comparison._repr_html_()
    comparison.compute()
    assert repr(comparison) == (f"Comparison(vanilla, myopic, {CONTROL}; τ 1,2; computed: topk (3/3), "
                                f"logit lens (3/3); folder {comparison.folder})")
    page = comparison._repr_html_()
    assert page.count("<td>✓</td>") == 6 and "60 held-out sequences of 32 tokens" in page
    assert str(comparison.folder) in page and "<table>" in page


def click(figure, menu: int, label: str) -> None:
    """Press a menu button the way plotly.js would."""
    button = next(b for b in figure.layout.updatemenus[menu].buttons if b.label == label)
    if button.method == "update":
        figure.plotly_update(restyle_data=button.args[0], relayout_data=button.args[1])
    else:
        figure.plotly_restyle(button.args[0])


def drawn(figure) -> dict[str, tuple]:
    """{name: y} of the lines one sees: visible, opaque, not a legend entry."""
    return {t.name: t.y for t in figure.data if t.visible is True and t.opacity == 1 and t.x != (None,)}


def test_figure_menus_show_the_chosen_kind_metric_and_tau(comparison):
    table = comparison.to_dataframe()
    figure = comparison.figure()
    assert [menu.buttons[menu.active].label for menu in figure.layout.updatemenus] == ["topk", "top1", "τ = 1"]
    legend = [t.name for t in figure.data if t.visible is True and t.showlegend is not False]
    assert legend == ["vanilla", "myopic", CONTROL, "unigram", "skip-bigram"]  # one entry per line, toggles all τ

    def expected(kind: str, metric: str, tau: int) -> dict[str, tuple]:
        chosen = table[(table["metric"] == metric) & (table["tau"] == tau) & (table["split"] == "test")]
        probes = chosen[chosen["probe"] == kind].sort_values("layer")
        lines = {name: tuple(part["value"]) for name, part in probes.groupby("checkpoint", sort=False)}
        target = probes["target"].iloc[0]
        for _, baseline in chosen[(chosen["checkpoint"] == "baseline") & (chosen["target"] == target)].iterrows():
            lines[baseline["probe"]] = (baseline["value"],) * 3  # flat over layers 0–2
        return lines

    assert drawn(figure) == expected("topk", "top1", 1)
    click(figure, 1, "top5")
    click(figure, 2, "τ = 2")
    assert drawn(figure) == expected("topk", "top5", 2)
    click(figure, 0, LOGIT_LENS)
    click(figure, 2, "τ = 1")
    assert drawn(figure) == expected(LOGIT_LENS, "top5", 1)
    assert "logit lens" in figure.layout.title.text and figure.layout.yaxis.title.text == METRIC_TITLES["top5"]
    click(figure, 0, "topk")
    click(figure, 2, "all τ")
    assert len(drawn(figure)) == 5 and sum(t.opacity == 1 and t.visible is True for t in figure.data) == 5 + 2 * 5


def test_heatmap_is_the_paired_difference_with_confidence_marks(comparison):
    accuracy = comparison.accuracy()
    heatmap = comparison.heatmap("vanilla", "myopic")
    difference = (accuracy.loc["vanilla"] - accuracy.loc["myopic"]).T  # layers × τ
    np.testing.assert_allclose(heatmap.data[0].z, difference.to_numpy(), atol=1e-12)
    same = comparison.heatmap("vanilla", "vanilla", layers=[1, 2], taus=[2])
    assert same.data[0].z.tolist() == [[0.0], [0.0]] and all(
        "n.s." in cell for row in same.data[0].text for cell in row
    )
    rows = comparison.difference("vanilla", "myopic")
    assert ((rows["ci_low"] <= rows["value"]) & (rows["value"] <= rows["ci_high"])).all()


def test_a_loss_matched_checkpoint_is_the_saved_step_nearest_the_other_loss(comparison, twins, monkeypatch):
    """The bracket's P_matched for any pair: the vanilla run's checkpoint whose held-out loss on the comparison's
    own sample is nearest the myopic twin's, added and probed like any checkpoint."""
    match = comparison.add_loss_matched("vanilla", to="myopic")
    target = match.myopic_losses.mean()
    assert set(match.vanilla_losses) == {10, 20, 30, 40}  # every step the run kept was a candidate
    gaps = {step: abs(losses.mean() - target) for step, losses in match.vanilla_losses.items()}
    assert gaps[match.step] == min(gaps.values())
    assert match.source.endswith(f"step-{match.step:07d}") and "vanilla at the myopic loss" in comparison.names
    matched = LMCheckpoint.load(match.source).model.state_dict()
    added = comparison.checkpoint("vanilla at the myopic loss").model.state_dict()
    assert all(torch.equal(matched[k], v.to(matched[k].device)) for k, v in added.items())
    heatmap = comparison.heatmap("vanilla at the myopic loss", "myopic")  # probed on the same sample, paired
    assert np.isfinite(np.asarray(heatmap.data[0].z, dtype=float)).all()
    with pytest.raises(ForethoughtError, match="no checkpoint named 'mtp2'; this comparison has vanilla, myopic"):
        comparison.add_loss_matched("mtp2", to="vanilla")
    with monkeypatch.context() as patch:  # a second match on the same sample measures nothing again
        patch.setattr("forethought.models.twins.token_losses", lambda *a, **k: pytest.fail("measured again"))
        again = comparison.add_loss_matched("vanilla", to="myopic", as_name="again")
    assert (again.step, again.source) == (match.step, match.source)


def test_a_model_in_memory_gives_the_numbers_of_its_folder(twins, tmp_path):
    checkpoint = LMCheckpoint.load(twins / "vanilla")
    comparison = Comparison.from_checkpoints([("folder", twins / "vanilla"), ("memory", checkpoint.model)],
                                             folder=tmp_path, tokenizer=checkpoint.tokenizer, random_init=False,
                                             tokens_root=str(twins / "tokens"), **SETTINGS)
    table = comparison.to_dataframe().set_index(KEY[1:])
    folder, memory = table[table["checkpoint"] == "folder"], table[table["checkpoint"] == "memory"]
    assert len(folder) == 2 * (3 * 3 * 3 + 3 * 3)  # probes (each also − skip-bigram, − unigram), lens
    assert folder.drop(columns="checkpoint").equals(memory.drop(columns="checkpoint"))
    assert not (tmp_path / "models").exists()  # held as it is: never saved, never loaded again


def test_bad_input_is_named_and_computed_results_stay_usable(comparison, twins, tmp_path, lm_folder, monkeypatch):
    table = comparison.to_dataframe()
    other_data = tmp_path / "other-data"  # the twins' model, trained on fewer documents: other held-out documents
    train_lm(LMTrainConfig.from_settings(corpus="embedded", max_documents=2000, model="gpt2-micro", seq_len=32,
                                         steps=2, batch_size=4, tokens_root=str(twins / "tokens"), progress=False,
                                         out=str(other_data)))
    no_work(monkeypatch)
    (tmp_path / "other" / "vanilla").mkdir(parents=True)
    (tmp_path / "broken").mkdir()
    failures = [
        (lambda: Comparison.from_checkpoints([twins / "vanilla", tmp_path / "other" / "vanilla"]),
         "two checkpoints are named 'vanilla'; name them NAME=PATH"),
        (lambda: Comparison.from_checkpoints({CONTROL: twins / "vanilla"}),
         f"the name '{CONTROL}' is kept for the control; name the checkpoint otherwise"),
        (lambda: comparison.add("broken", tmp_path / "broken"),
         f"checkpoint 'broken' ({tmp_path / 'broken'}) cannot be loaded: checkpoint folder {tmp_path / 'broken'} "
         "has no config.json"),
        (lambda: comparison.add("myopic", twins / "myopic"), "two checkpoints are named 'myopic'"),
        (lambda: comparison.add("fewer", other_data),
         "fewer was trained on other data than vanilla (max_documents 2000 vs 3000): their held-out documents differ"),
        (lambda: comparison.add("words", lm_folder),
         "checkpoint 'words' uses another tokenizer than 'vanilla': they cannot be probed on the same tokens"),
        (lambda: comparison.heatmap("vanilla", "myopic", taus=[3]),
         "τ [3] not computed: this comparison probes τ 1, 2 (set taus= when building it)"),
        (lambda: comparison.accuracy(layers=[1, 5]),
         "layer [5] not computed for 'vanilla': it is probed at layers 0, 1, 2"),
        (lambda: comparison.figure(tau=4), "τ [4] not computed"),
        (lambda: comparison.heatmap("vanilla", "nope"),
         f"no checkpoint named 'nope'; this comparison holds vanilla, myopic, {CONTROL}"),
        (lambda: comparison.figure(metric="accuracy"), "unknown metric 'accuracy'; choose one of top1, top5"),
        (lambda: comparison.scores("vanilla", kind="quadratic"), "unknown probe kind 'quadratic'"),
        (lambda: Comparison.from_checkpoints([twins / "vanilla"], tau="1"), "unknown settings ['tau']; the probe"),
    ]
    for attempt, message in failures:
        with pytest.raises(ForethoughtError, match="^" + re.escape(message)):
            attempt()
    assert comparison.names == ["vanilla", "myopic", CONTROL]
    assert comparison.to_dataframe().equals(table)
    assert comparison.accuracy(layers=[1], taus=[2]).shape == (3, 1)


def test_compare_command_writes_the_figure_of_a_run(probed, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    assert main(["compare", "--run", str(probed[0]), "--figures-dir", str(tmp_path), "--no-progress"]) == 0
    assert "computed: topk (3/3)" in capsys.readouterr().out and (tmp_path / "compare_topk.html").is_file()
    assert main(["compare", "--figures-dir", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == "forethought: error: give --run: the --out folder of a forethought probe or precache run\n"
    )
    assert main(["compare", "--run", str(tmp_path)]) == 2
    assert f"{tmp_path} holds no probe or precache run (no config.json)" in capsys.readouterr().err


def test_a_llama_goes_through_cache_probes_and_comparison(llama_folder, llama_gguf, llama_text, tmp_path):
    """A Llama-architecture model, from its folder and from a GGUF file of it: the same weights, so exactly the
    same rows; the cache holds its residual stream by DESIGN.md's convention, on exactly the tokens probed."""
    comparison = Comparison.from_checkpoints(
        {"llama": llama_folder, "gguf": f"gguf:{llama_gguf}"}, folder=tmp_path, corpus=str(llama_text),
        layout="packed", seq_len=16, tokens_root=str(tmp_path / "tokens"), **{**SETTINGS, "max_sequences": 200})
    table = comparison.to_dataframe()
    assert set(table["checkpoint"]) == {"llama", "gguf", CONTROL, "baseline"}
    assert set(table.loc[table["probe"] == "topk", "layer"]) == {0, 1, 2}
    assert set(table.loc[table["probe"] == LOGIT_LENS, "layer"]) == {0, 1, 2}
    llama, gguf = (table[table["checkpoint"] == name].drop(columns="checkpoint").reset_index(drop=True)
                   for name in ("llama", "gguf"))
    assert llama.equals(gguf)
    heatmap = comparison.heatmap("llama", "gguf")
    assert np.all(heatmap.data[0].z == 0) and all("n.s." in cell for row in heatmap.data[0].text for cell in row)
    cache = forethought.probes.cache.ResidualCache.open(tmp_path / "caches" / "llama")
    np.testing.assert_array_equal(cache.tokens, comparison.tokens)  # nothing prepended, nothing shifted
    model = LMCheckpoint.load(llama_folder).model
    tokens = torch.from_numpy(comparison.tokens[:4])
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
        final = model.model.norm(torch.from_numpy(np.asarray(cache.layer(2)[:4], dtype=np.float32)))
    np.testing.assert_allclose(cache.layer(0)[:4], model.model.embed_tokens(tokens).detach(), atol=1e-3)
    np.testing.assert_allclose(final, hidden[2], atol=2e-2)  # HF's last entry has the final norm applied
    assert comparison.figure().data and "llama" in repr(comparison)


def test_another_name_for_the_same_weights_reuses_their_cache(comparison, twins, monkeypatch):
    original = comparison.cache("vanilla")
    no_work(monkeypatch)  # nothing is run through the model again
    comparison.add("vanilla again", twins / "vanilla")
    linked = comparison.cache("vanilla again")
    assert linked.folder != original.folder and np.array_equal(linked.layer(1), original.layer(1))
    assert all((linked.folder / path.name).samefile(path) for path in original.folder.iterdir())  # linked files
