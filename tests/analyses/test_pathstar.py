"""Path-star evaluation on hand-built models with known answers, and a tiny run end to end."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from forethought.analyses.pathstar import CONTROL, PathStarConfig, PathStarResults, evaluate_model, run_pathstar
from forethought.core.errors import ForethoughtError
from forethought.models.tasks.pathstar import PathStarSpec, generate_split


class Oracle(nn.Module):
    """Knows each graph's emitted sequence; puts all mass on the right token at every target prediction."""

    def __init__(self, data, regime):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.spec = data.spec
        self.answers = {p.tobytes(): t for p, t in zip(data.prefix_tokens(), data.target(regime))}

    def forward(self, inputs, use_cache=False):
        prefix_len = self.spec.prefix_len
        logits = torch.zeros(*inputs.shape, self.spec.vocab_size)
        for row, tokens in enumerate(inputs.numpy()):
            answer = self.answers[tokens[:prefix_len].astype(np.int64).tobytes()]
            for i in range(min(len(answer), inputs.shape[1] - prefix_len + 1)):
                logits[row, prefix_len - 1 + i, answer[i]] = 1
        return SimpleNamespace(logits=logits)


class CleverHans(nn.Module):
    """The cheat: at '=' say the start; after a node, say its first-written child. No planning."""

    def __init__(self, spec):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.spec = spec

    def forward(self, inputs, use_cache=False):
        spec, tokens = self.spec, inputs.numpy()
        logits = torch.zeros(*inputs.shape, spec.vocab_size)
        edges = tokens[:, : 3 * spec.n_edges].reshape(len(tokens), spec.n_edges, 3)[:, :, :2]
        for row in range(len(tokens)):
            logits[row, spec.prefix_len - 1, tokens[row, spec.prefix_len - 3]] = 1  # the start
            for position in range(spec.prefix_len, tokens.shape[1]):
                children = edges[row][edges[row, :, 0] == tokens[row, position], 1]
                if len(children):
                    logits[row, position, children[0]] = 1
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def graphs():
    return generate_split(PathStarSpec(2, 4, 20), 10, 400, seed=0)[1]


@pytest.mark.parametrize("regime", ["teacher-forcing", "teacherless", "reverse"])
def test_oracle_scores_perfectly(graphs, regime):
    rows = pd.DataFrame(evaluate_model(Oracle(graphs, regime), graphs, regime))
    assert (rows["value"] == 1.0).all()
    assert set(rows["target"]) == {"path", "position 1", "position 2", "position 3", "position 4"}


def test_clever_hans_signature(graphs):
    rows = pd.DataFrame(evaluate_model(CleverHans(graphs.spec), graphs, "teacher-forcing"))
    value = rows.set_index(["metric", "target"])["value"]
    first_arm_is_goal = (graphs.goal_arm() == 0).mean()  # the cheat's decision is right this often
    assert value["forced_accuracy", "position 3"] == value["forced_accuracy", "position 4"] == 1.0
    assert value["position_accuracy", "position 2"] == pytest.approx(first_arm_is_goal)
    assert value["exact_path", "path"] == pytest.approx(first_arm_is_goal)
    assert 0.4 < first_arm_is_goal < 0.6  # ≈ 1/d


TINY = dict(degree=2, length=3, n_nodes=8, n_train=200, n_test=60, n_layer=1, d_model=16, n_head=2,
            epochs=2.0, batch_size=32, eval_samples=40, probe_samples=60, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pathstar") / "run"
    return run_pathstar(PathStarConfig.from_preset("cpu", **TINY, out=str(out))), out


def test_tiny_run_tables_and_figures(tiny_run):
    results, out = tiny_run
    table = results.accuracy_table()
    assert len(table) == 6 and set(table["training"]) == {"vanilla", "myopic"}
    assert table[["exact_path", "decision_token", "forced_positions_3+"]].apply(lambda c: c.between(0, 1)).all().all()
    probes = results.table[results.table["probe"] == "logistic"]
    assert set(probes["checkpoint"]) == {"vanilla", "myopic", CONTROL}
    assert set(probes["position"]) == {0, 1, 2} and set(probes["layer"]) == {0, 1}
    assert set(probes.dropna(subset=["tau"])["tau"]) == {1, 2, 3}
    for stem in ("pathstar_accuracy", "pathstar_positions", "pathstar_probes"):
        assert (out / "figures" / f"{stem}.html").exists()
    assert len(results.probe_figure().data) > 0 and "goal-arm" in results.summary()
    at_equals, at_target = (results.probe_figure(position).layout.title.text for position in (0, 1))
    assert f"1/d = {results.chance:.2f}" in at_equals and "layer 0" in at_equals and "layer 0" not in at_target
    reloaded = PathStarResults.from_folder(out)
    pd.testing.assert_frame_equal(reloaded.table, results.table)


def test_rerun_reproduces(tiny_run):
    results, out = tiny_run
    again = run_pathstar(PathStarConfig.from_preset("cpu", **TINY, out=str(out)))
    pd.testing.assert_frame_equal(again.table, results.table)


def test_files_train_and_bad_settings(tmp_path, caplog):
    train, test = generate_split(PathStarSpec(3, 4, 12), 100, 20, seed=3)  # not the config's G(2, 3, 8)
    train.save(tmp_path / "train.txt")
    test.save(tmp_path / "test.txt")
    chosen = {"regimes": ("reverse",), "trainings": ("myopic",)}
    config = PathStarConfig.from_preset("cpu", **{**TINY, "epochs": 0.3, **chosen},
                                        train_file=str(tmp_path / "train.txt"), test_file=str(tmp_path / "test.txt"),
                                        out=str(tmp_path / "run"))
    with caplog.at_level("WARNING"):
        results = run_pathstar(config)
    assert "have degree 3 and length 4: those are used, not degree 2 and length 3" in caplog.text  # said, not silent
    assert results.accuracy_table()[["regime", "training"]].values.tolist() == [["reverse", "myopic"]]
    assert (results.config.degree, results.config.length, results.config.n_nodes) == (3, 4, 12)  # from the graphs
    assert results.chance == pytest.approx(1 / 3) and "G(3, 4, 12)" in results.summary()
    assert "forced_positions_3+" in results.accuracy_table()  # positions 3 … l of the files' l = 4
    with pytest.raises(ForethoughtError, match="unknown regime 'teacherles'"):
        PathStarConfig.from_preset("cpu", regimes=("teacherles",))
    with pytest.raises(ForethoughtError, match="unknown training"):
        PathStarConfig.from_preset("cpu", trainings=("lazy",))
    with pytest.raises(ForethoughtError, match="both `train_file` and `test_file`"):
        PathStarConfig.from_preset("cpu", train_file="x")
    with pytest.raises(ForethoughtError, match="`train_file` and `test_file` are the same file"):
        PathStarConfig.from_preset("cpu", train_file=str(tmp_path / "train.txt"), test_file=str(tmp_path / "train.txt"))
