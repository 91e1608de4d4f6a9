"""Probe metrics with 95 % bootstrap intervals over held-out *sequences*.

Positions of one sequence are not independent, so the resampling unit is the sequence: each metric is
computed from per-sequence sufficient statistics, and the bootstrap reweights whole sequences.
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
    """A metric on held-out data with its bootstrap interval; ``n`` examples from ``n_sequences`` sequences."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    n_sequences: int

    def columns(self) -> dict[str, float | int]:
        """The results-table cells: value, ci_low, ci_high, n."""
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def _per_sequence_sums(values: np.ndarray, sequence_ids: np.ndarray) -> np.ndarray:
    """values [n, k] → sums per sequence [n_sequences, k] (sequence ids relabelled 0 … S − 1)."""
    if len(values) != len(sequence_ids):
        raise ForethoughtError(f"{len(values)} values but {len(sequence_ids)} sequence ids")
    _, labels = np.unique(sequence_ids, return_inverse=True)
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
    """Point estimates and percentile intervals of ``statistic`` over resampled sequences.

    Args:
        stats: per-sequence sufficient statistics [n_sequences, k].
        statistic: maps summed statistics [..., k] to metric values [..., m].
    """
    n_sequences = len(stats)
    value = statistic(stats.sum(0))  # [m]
    counts = np.random.default_rng(seed).multinomial(n_sequences, np.full(n_sequences, 1 / n_sequences), n_boot)
    replicates = statistic(counts @ stats)  # [n_boot, m]
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():  # a metric undefined in every replicate (e.g. 0 / 0) gets a NaN interval
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(replicates, [tail, 100 - tail], axis=0)
    return [
        Estimate(float(v), float(lo), float(hi), n_examples, n_sequences)
        for v, lo, hi in zip(value, low, high)
    ]


def r2_scores(targets: np.ndarray, predictions: np.ndarray, sequence_ids: np.ndarray, seed: int = 0) -> list[Estimate]:
    """Coefficient of determination per target column: targets, predictions [n] or [n, m]."""
    y = targets.reshape(len(targets), -1).astype(np.float64)
    residual = y - predictions.reshape(y.shape)
    m = y.shape[1]
    stats = _per_sequence_sums(np.concatenate([np.ones((len(y), 1)), y, y**2, residual**2], axis=1), sequence_ids)

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


def mean_scores(values: np.ndarray, sequence_ids: np.ndarray, seed: int = 0) -> list[Estimate]:
    """Mean per column of per-example values [n] or [n, m] (accuracy from 0/1 hits, loss from losses)."""
    v = values.reshape(len(values), -1).astype(np.float64)
    stats = _per_sequence_sums(np.concatenate([np.ones((len(v), 1)), v], axis=1), sequence_ids)
    return bootstrap(stats, lambda sums: sums[..., 1:] / sums[..., :1], len(v), seed=seed)


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
    p = np.where(np.isnan(z), 1.0, 2 * stats.norm.sf(z))
    significant[finite] = stats.false_discovery_control(p, method="bh") <= rate
    return significant
