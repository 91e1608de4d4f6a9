"""Metrics match their definitions; intervals resample whole sequences."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import r2_score

from forethought.probes.metrics import fdr_significant, mean_scores, r2_scores


def test_r2_point_estimates_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(500, 3))
    pred = y + rng.normal(size=(500, 3)) * [0.1, 1.0, 3.0]
    ids = np.repeat(np.arange(50), 10)
    estimates = r2_scores(y, pred, ids)
    for column, estimate in enumerate(estimates):
        assert estimate.value == pytest.approx(r2_score(y[:, column], pred[:, column]))
        assert estimate.ci_low < estimate.value < estimate.ci_high
        assert (estimate.n, estimate.n_clusters) == (500, 50)


def test_interval_reflects_sequences_not_positions():
    """Values constant within a sequence: the CI must be as wide as S sequences allow, not S·T points."""
    rng = np.random.default_rng(1)
    n_sequences, length = 400, 50
    values = np.repeat(rng.normal(size=n_sequences), length)
    ids = np.repeat(np.arange(n_sequences), length)
    (estimate,) = mean_scores(values, ids)
    assert estimate.value == pytest.approx(values.mean())
    expected_width = 2 * 1.96 / np.sqrt(n_sequences)  # standard error of a mean of 400 unit-variance draws
    assert estimate.ci_high - estimate.ci_low == pytest.approx(expected_width, rel=0.15)


def test_resampling_documents_covers_at_the_nominal_rate_and_resampling_windows_does_not():
    """Simulated held-out text with a planted document effect: 40 documents × 5 windows × 10 positions, value =
    document effect + window effect + noise, true mean 0. Over 400 simulated samples the 95 % interval that
    resamples documents covers 0 about 95 % of the time; the one that resamples windows is far too narrow."""
    rng = np.random.default_rng(0)
    documents = np.repeat(np.arange(40), 50)
    windows = np.repeat(np.arange(200), 10)
    covered = {"documents": 0, "windows": 0}
    for seed in range(400):
        values = rng.normal(size=40)[documents] + 0.5 * rng.normal(size=200)[windows] + rng.normal(size=2000)
        for unit, clusters in (("documents", documents), ("windows", windows)):
            (estimate,) = mean_scores(values, clusters, seed=seed)
            covered[unit] += estimate.ci_low <= 0 <= estimate.ci_high
    assert 0.90 <= covered["documents"] / 400 <= 0.98, covered
    assert covered["windows"] / 400 < 0.80, covered


def test_fdr_marks_follow_benjamini_hochberg_over_the_grid():
    # a 95 % interval read as normal: value ± 1.96 se; se = 1 here, so z = value
    z = np.array([[5.0, 2.1, 0.1], [2.0, 0.0, -4.0], [np.nan, 1.0, -2.05]])
    low, high = z - 1.96, z + 1.96
    significant = fdr_significant(z, low, high)
    p = 2 * norm.sf(np.abs(z[np.isfinite(z)]))  # 8 finite cells
    order = np.argsort(p)
    passed = p[order] <= 0.05 * np.arange(1, 9) / 8  # BH: the largest k with p_(k) ≤ k·q/m, and all below it
    k = np.nonzero(passed)[0].max() + 1
    expected = np.zeros(8, dtype=bool)
    expected[order[:k]] = True
    np.testing.assert_array_equal(significant[np.isfinite(z)], expected)
    assert significant[0, 0] and significant[1, 2] and not significant[2, 0]
    assert not significant[0, 1] and ((low > 0) | (high < 0))[0, 1]  # each alone "significant"; not over the grid
