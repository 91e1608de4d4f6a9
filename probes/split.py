"""The probe split, in one place: which whole sequences train, validate and test the probes, and the classes
top-K probes predict.

Sequences, never positions of one sequence, are split. A :class:`ProbeSplit` is decided once per probe grid
from the tokens and the fitting settings, and handed to the probes and to the count baselines they are compared
with, so both score exactly the same held-out examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forethought.core.errors import ForethoughtError


def split_sequences(n_sequences: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint (train, test) index arrays over whole sequences."""
    if not 0 < test_fraction < 1:
        raise ForethoughtError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = max(1, round(n_sequences * test_fraction))
    if n_test >= n_sequences:
        raise ForethoughtError(f"{n_sequences} sequences are too few to hold out {test_fraction:.0%}")
    order = np.random.default_rng(seed).permutation(n_sequences)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def top_classes(tokens: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` most frequent token ids of ``tokens`` (the topk probes' classes; ties: smaller id)."""
    counts = np.bincount(tokens.ravel())
    return np.argsort(-counts, kind="stable")[:k]


@dataclass(frozen=True)
class ProbeSplit:
    """Sequence ids of each part (sorted), and the classes the probes predict."""

    train: np.ndarray  # the probes learn from these: fit ∪ validation
    validation: np.ndarray  # of train: early stopping
    test: np.ndarray  # held out: every score
    classes: np.ndarray | None  # top-K probes: the K most frequent training tokens (+ "other"); None: every token

    @property
    def fit(self) -> np.ndarray:
        """The training sequences gradient steps are taken on (train without validation)."""
        return np.setdiff1d(self.train, self.validation)

    @classmethod
    def of(cls, tokens: np.ndarray, test_fraction: float, validation_fraction: float, seed: int,
           top_k: int | None = None) -> ProbeSplit:
        """Split the sequences of ``tokens`` [n, T]; with ``top_k``, the classes are its training split's
        ``top_k`` most frequent tokens."""
        train, test = split_sequences(len(tokens), test_fraction, seed=seed)
        n_validation = max(1, round(len(train) * validation_fraction))
        validation = np.sort(np.random.default_rng(seed).permutation(train)[:n_validation])
        classes = None if top_k is None else top_classes(np.asarray(tokens)[train], top_k)
        return cls(train, validation, test, classes)
