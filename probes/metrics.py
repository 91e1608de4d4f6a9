"""Probe metrics with 95 % bootstrap intervals over held-out *clusters*: sequences, or the documents they come from.

Positions of one sequence are not independent, nor are sequences cut from one document, so the resampling unit
is the cluster the caller names (the held-out sample's documents, :class:`models.heldout.HeldOutSample`; a
sequence where nothing groups them): each metric is computed from per-cluster sufficient statistics, and the
bootstrap reweights whole clusters (a cluster bootstrap).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from forethought.core.errors import ForethoughtError

N_BOOTSTRAP = 1000


@dataclass(frozen=True)
class Estimate:
    """A metric on held-out data with its bootstrap interval; ``n`` examples from ``n_clusters`` clusters."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    n_clusters: int

    def columns(self) -> dict[str, float | int]:
        """The results-table cells: value, ci_low, ci_high, n."""
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def per_cluster_sums(values: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """values [n, k] → sums per cluster [n_clusters, k] (cluster ids relabelled 0 … C − 1)."""
    if len(values) != len(clusters):
        raise ForethoughtError(f"{len(values)} values but {len(clusters)} cluster ids")
    _, labels = np.unique(clusters, return_inverse=True)
    sums = np.zeros((labels.max() + 1, values.shape[1]))
    np.add.at(sums, labels, values)
    return sums


def bootstrap(
    stats: np.ndarray,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_examples: int,
    n_boot: int = N_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> list[Estimate]:
    """Point estimates and percentile intervals of ``statistic`` over resampled clusters.

    Args:
        stats: per-cluster sufficient statistics [n_clusters, k].
        statistic: maps summed statistics [..., k] to metric values [..., m].
    """
    n_clusters = len(stats)
    value = statistic(stats.sum(0))  # [m]
    counts = np.random.default_rng(seed).multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), n_boot)
    replicates = statistic(counts @ stats)  # [n_boot, m]
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():  # a metric undefined in every replicate (e.g. 0 / 0) gets a NaN interval
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(replicates, [tail, 100 - tail], axis=0)
    return [
        Estimate(float(v), float(lo), float(hi), n_examples, n_clusters)
        for v, lo, hi in zip(value, low, high)
    ]


def r2_scores(targets: np.ndarray, predictions: np.ndarray, clusters: np.ndarray, seed: int = 0) -> list[Estimate]:
    """Coefficient of determination per target column: targets, predictions [n] or [n, m]."""
    y = targets.reshape(len(targets), -1).astype(np.float64)
    residual = y - predictions.reshape(y.shape)
    m = y.shape[1]
    stats = per_cluster_sums(np.concatenate([np.ones((len(y), 1)), y, y**2, residual**2], axis=1), clusters)

    def r2(sums: np.ndarray) -> np.ndarray:
        count, total, squares, errors = (
            sums[..., :1],
            sums[..., 1 : 1 + m],
            sums[..., 1 + m : 1 + 2 * m],
            sums[..., 1 + 2 * m :],
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1 - errors / (squares - total**2 / count)

    return bootstrap(stats, r2, len(y), seed=seed)


def mean_scores(values: np.ndarray, clusters: np.ndarray, seed: int = 0) -> list[Estimate]:
    """Mean per column of per-example values [n] or [n, m] (accuracy from 0/1 hits, loss from losses)."""
    v = values.reshape(len(values), -1).astype(np.float64)
    stats = per_cluster_sums(np.concatenate([np.ones((len(v), 1)), v], axis=1), clusters)
    return bootstrap(stats, lambda sums: sums[..., 1:] / sums[..., :1], len(v), seed=seed)


POOLED = "test"  # the split column of scores over the whole held-out sample


def text_split(text: str) -> str:
    """The split column of scores over one text of a mixed held-out sample."""
    return f"{POOLED}: {text}"


def text_groups(texts: np.ndarray | None, n: int) -> list[tuple[str, np.ndarray | slice]]:
    """(split, examples) to report: the whole sample (split "test") where ``texts`` is None, else each text of a
    mixed sample (split "test: <text>"; none where the sample holds one text)."""
    if texts is None:
        return [(POOLED, slice(0, n))]
    names = list(dict.fromkeys(texts.tolist()))
    return [(text_split(text), texts == text) for text in names] if len(names) > 1 else []


def fdr_significant(value: np.ndarray, ci_low: np.ndarray, ci_high: np.ndarray, rate: float = 0.05) -> np.ndarray:
    """Which differences stay significant when a whole grid of them is read at once: Benjamini–Hochberg at
    false-discovery rate ``rate`` over every finite cell. Each cell's two-sided p-value comes from its 95 %
    interval read as a normal one (standard error = width / 3.92); cells without an interval are not
    significant. Same shape as ``value``."""
    value, low, high = (np.asarray(a, dtype=np.float64) for a in (value, ci_low, ci_high))
    standard_error = (high - low) / (2 * stats.norm.ppf(0.975))
    finite = np.isfinite(value) & np.isfinite(standard_error)
    significant = np.zeros(value.shape, dtype=bool)
    if not finite.any():
        return significant
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(value[finite]) / standard_error[finite]  # a zero-width interval: z = ∞ unless value is 0
    p = np.full(value.shape, np.nan)
    p[finite] = np.where(np.isnan(z), 1.0, 2 * stats.norm.sf(z))
    return bh_significant(p, rate)


def bh_significant(p: np.ndarray, rate: float = 0.05) -> np.ndarray:
    """Which of a grid's p-values stay significant at false-discovery rate ``rate`` (Benjamini–Hochberg over every
    finite one; NaN: not significant). Same shape as ``p``."""
    p = np.asarray(p, dtype=np.float64)
    significant = np.zeros(p.shape, dtype=bool)
    finite = np.isfinite(p)
    if finite.any():
        significant[finite] = stats.false_discovery_control(p[finite], method="bh") <= rate
    return significant


def across_runs_p(values: np.ndarray) -> np.ndarray:
    """Two-sided p-value of a one-sample t-test of each row's run values [k, n_runs] against 0 — what the spread
    between training seeds (not the intervals within one run) says; NaN with fewer than two runs or no spread."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[1] < 2:
        return np.full(len(values), np.nan)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without spread: NaN
        return stats.ttest_1samp(values, 0.0, axis=1).pvalue
