"""Fitting probes over a grid of layers, with held-out *sequences*.

Residuals come as [n_layers, n_sequences, seq, d_model]; a probe per layer is fitted on the training
sequences' positions and scored on the held-out sequences' positions (never splitting a sequence).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from forethought.core.errors import ForethoughtError
from forethought.probes.linear import LogisticProbe, RidgeProbe
from forethought.probes.metrics import Estimate


def _rows(array: np.ndarray, sequences: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n_sequences, seq, ...] → examples [len(sequences)·len(positions), ...] and their sequence ids."""
    picked = array[sequences][:, positions]
    ids = np.repeat(sequences, len(positions))
    return picked.reshape(len(ids), *array.shape[2:]), ids


def _layer_examples(residuals, targets, layers, positions, split) -> Iterator[tuple]:
    """Per layer: (layer, x_train, y_train, x_test, y_test, test_sequence_ids)."""
    residuals, targets = np.asarray(residuals), np.asarray(targets)
    if len(residuals) != len(layers):
        raise ForethoughtError(f"{len(residuals)} residual layers but {len(layers)} layer labels")
    train, test = split
    y_train, _ = _rows(targets, train, positions)
    y_test, test_ids = _rows(targets, test, positions)
    for layer, layer_residuals in zip(layers, residuals):
        x_train, _ = _rows(layer_residuals, train, positions)
        x_test, _ = _rows(layer_residuals, test, positions)
        yield layer, x_train, y_train, x_test, y_test, test_ids


def _row(layer: int, target: str, metric: str, estimate: Estimate) -> dict:
    return {"layer": layer, "target": target, "metric": metric, "split": "test", **estimate.columns()}


def fit_ridge_by_layer(
    residuals: np.ndarray,
    targets: np.ndarray,
    target_names: Sequence[str],
    layers: Sequence[int],
    positions: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    alpha: float = 1e-4,
) -> pd.DataFrame:
    """R² of a ridge probe per (layer, target) on held-out sequences, with bootstrap CIs.

    Args:
        residuals: [len(layers), n_sequences, seq, d_model].
        targets: [n_sequences, seq, n_targets]; all targets must be finite at ``positions``.
        positions: sequence positions used as examples (same for train and test).
        split: (train, test) sequence indices, e.g. from :func:`split_sequences`.

    Returns one row per (layer, target): layer, target, metric="r2", split="test", value, ci_low, ci_high, n.
    """
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape[-1] != len(target_names):
        raise ForethoughtError(f"{targets.shape[-1]} target columns but {len(target_names)} target names")
    rows = []
    for layer, x_train, y_train, x_test, y_test, test_ids in _layer_examples(
        residuals, targets, layers, positions, split
    ):
        if not (np.isfinite(y_train).all() and np.isfinite(y_test).all()):
            raise ForethoughtError("probe targets are undefined (NaN) at some of the probed positions")
        probe = RidgeProbe(alpha=alpha).fit(x_train, y_train)
        for name, estimate in zip(target_names, probe.score(x_test, y_test, test_ids)):
            rows.append(_row(layer, name, "r2", estimate))
    return pd.DataFrame(rows)


def fit_logistic_by_layer(
    residuals: np.ndarray,
    labels: np.ndarray,
    target_name: str,
    n_classes: int,
    layers: Sequence[int],
    positions: np.ndarray,
    split: tuple[np.ndarray, np.ndarray],
    l2: float = 1e-3,
) -> pd.DataFrame:
    """Accuracy and cross-entropy of a logistic-regression probe per layer on held-out sequences, bootstrap CIs.

    Args:
        residuals: [len(layers), n_sequences, seq, d_model].
        labels: [n_sequences, seq] integer classes in 0 … n_classes − 1 at ``positions``.

    Returns two rows per layer (metric "accuracy" and "cross_entropy"), columns as :func:`fit_ridge_by_layer`.
    """
    rows = []
    for layer, x_train, y_train, x_test, y_test, test_ids in _layer_examples(
        residuals, labels, layers, positions, split
    ):
        probe = LogisticProbe(n_classes=n_classes, l2=l2).fit(x_train, y_train)
        for metric, estimate in probe.score(x_test, y_test, test_ids).items():
            rows.append(_row(layer, target_name, metric, estimate))
    return pd.DataFrame(rows)
