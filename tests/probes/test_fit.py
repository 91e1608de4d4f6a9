"""Grid fitting: whole sequences held out; planted signals found at their layer only."""

from __future__ import annotations

import numpy as np
import pytest

from forethought.core.errors import ForethoughtError
from forethought.probes.fit import fit_logistic_by_layer, fit_ridge_by_layer
from forethought.probes.split import split_sequences


def test_split_is_disjoint_and_complete():
    train, test = split_sequences(100, test_fraction=0.2, seed=3)
    assert len(test) == 20 and not set(train) & set(test)
    assert sorted([*train, *test]) == list(range(100))
    with pytest.raises(ForethoughtError, match="too few"):
        split_sequences(1, 0.5)


def test_planted_signal_found_at_its_layer_only():
    rng = np.random.default_rng(0)
    n_sequences, seq, d = 120, 16, 12
    target = rng.normal(size=(n_sequences, seq, 1))
    noise = rng.normal(size=(3, n_sequences, seq, d))
    residuals = noise.copy()
    residuals[1, ..., 0] += 3 * target[..., 0]  # layer 1 carries the target linearly
    results = fit_ridge_by_layer(
        residuals, target, ["planted"], layers=[0, 1, 2], positions=np.arange(seq),
        split=split_sequences(n_sequences, 0.25, seed=0),
    )
    r2 = results.set_index("layer")["value"]
    assert r2[1] == pytest.approx(0.9, abs=0.03)  # 9 / (9 + 1)
    assert abs(r2[0]) < 0.05 and abs(r2[2]) < 0.05
    assert set(results.columns) >= {"layer", "target", "metric", "split", "value", "ci_low", "ci_high", "n"}
    assert (results["n"] == 30 * seq).all()


def test_nan_targets_at_probed_positions_are_refused():
    targets = np.full((8, 4, 1), np.nan)
    with pytest.raises(ForethoughtError, match="undefined"):
        fit_ridge_by_layer(np.zeros((1, 8, 4, 2)), targets, ["t"], [0], np.arange(4), split_sequences(8))


def test_softmax_grid_finds_planted_classes_at_their_layer():
    rng = np.random.default_rng(1)
    n_sequences, seq, d = 300, 2, 6
    labels = rng.integers(0, 3, size=(n_sequences, seq))
    residuals = rng.normal(size=(2, n_sequences, seq, d))
    residuals[1, ..., :3] += 4 * np.eye(3)[labels]  # layer 1 encodes the class one-hot
    results = fit_logistic_by_layer(residuals, labels, "planted", 3, [0, 1], np.arange(seq),
                                   split_sequences(n_sequences, 0.3, seed=0))
    accuracy = results[results["metric"] == "accuracy"].set_index("layer")["value"]
    assert accuracy[1] > 0.97
    assert accuracy[0] == pytest.approx(1 / 3, abs=0.08)
    assert set(results["metric"]) == {"accuracy", "cross_entropy"}
