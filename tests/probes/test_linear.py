"""Probes recover planted signals and agree with independent solvers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss

from forethought.core.errors import ForethoughtError
from forethought.probes.linear import LogisticProbe, RidgeProbe


def test_ridge_recovers_planted_linear_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6000, 10))
    w = rng.normal(size=10)
    noise = 0.5
    y = np.stack([x @ w + noise * rng.normal(size=6000), np.sin(3 * rng.normal(size=6000))], axis=1)
    probe = RidgeProbe(alpha=1e-4).fit(x[:4000], y[:4000])
    pred = probe.predict(x[4000:])
    scored = probe.score(x[4000:], y[4000:], sequence_ids=np.arange(2000) // 20)
    residual_var = ((y[4000:] - pred) ** 2).mean(0)
    expected_r2 = 1 - noise**2 / (w @ w + noise**2)
    observed_r2 = 1 - residual_var / y[4000:].var(0)
    assert observed_r2[0] == pytest.approx(expected_r2, abs=0.01)
    assert abs(observed_r2[1]) < 0.01  # unrelated target: nothing to decode
    assert [estimate.value for estimate in scored] == pytest.approx(list(observed_r2))
    design = np.hstack([x[:4000], np.ones((4000, 1))])
    coef, *_ = np.linalg.lstsq(design, y[:4000, 0], rcond=None)  # tiny alpha ≈ least squares
    np.testing.assert_allclose(pred[:, 0], np.hstack([x[4000:], np.ones((2000, 1))]) @ coef, atol=1e-5)


def test_softmax_recovers_planted_classes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 8))
    w = rng.normal(size=(8, 4)) * 3
    labels = (x @ w + rng.gumbel(size=(3000, 4))).argmax(1)  # a true softmax model
    probe = LogisticProbe(n_classes=4, l2=1e-4).fit(x[:2000], labels[:2000])
    accuracy = (probe.predict(x[2000:]) == labels[2000:]).mean()
    bayes = ((x[2000:] @ w).argmax(1) == labels[2000:]).mean()  # the true weights' accuracy
    assert accuracy > bayes - 0.03
    scores = probe.score(x[2000:], labels[2000:], sequence_ids=np.arange(1000) // 10)
    assert scores["accuracy"].value == pytest.approx(accuracy)
    probabilities = np.exp(probe.logits(x[2000:]))
    probabilities /= probabilities.sum(1, keepdims=True)
    assert scores["cross_entropy"].value == pytest.approx(log_loss(labels[2000:], probabilities))
    assert scores["accuracy"].n_clusters == 100


def test_softmax_on_random_labels_is_at_chance():
    rng = np.random.default_rng(2)
    x, labels = rng.normal(size=(4000, 5)), rng.integers(0, 4, size=4000)
    probe = LogisticProbe(n_classes=4).fit(x[:3000], labels[:3000])
    assert (probe.predict(x[3000:]) == labels[3000:]).mean() == pytest.approx(0.25, abs=0.05)


def test_bad_probe_input_is_named():
    x = np.zeros((10, 3))
    with pytest.raises(ForethoughtError, match="10 feature rows but 9 targets"):
        RidgeProbe().fit(x, np.zeros(9))
    with pytest.raises(ForethoughtError, match="features must be"):
        RidgeProbe().fit(np.zeros(10), np.zeros(10))
    with pytest.raises(ForethoughtError, match="NaN"):
        RidgeProbe().fit(np.full((10, 3), np.nan), np.zeros(10))
    with pytest.raises(ForethoughtError, match=r"labels must lie in 0 … 2"):
        LogisticProbe(n_classes=3).fit(x, np.full(10, 3))
