"""The probe split, in one place: which whole sequences train, validate and test the probes, and the classes
top-K probes predict.

Sequences, never positions of one sequence, are split — and whole clusters of them where the held-out sample
names clusters (the documents the sequences were cut from), so that no document feeds both the probes' training
and their test. A :class:`ProbeSplit` is decided once per probe grid
from the tokens and the fitting settings, and handed to the probes and to the count baselines they are compared
with, so both score exactly the same held-out examples.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from forethought.core.errors import ForethoughtError


def split_sequences(n_sequences: int, test_fraction: float = 0.25, seed: int = 0,
                    unit: str = "sequences") -> tuple[np.ndarray, np.ndarray]:
    """Random disjoint (train, test) index arrays over whole sequences (or other ``unit``s)."""
    if not 0 < test_fraction < 1:
        raise ForethoughtError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n_test = max(1, round(n_sequences * test_fraction))
    if n_test >= n_sequences:
        raise ForethoughtError(f"{n_sequences} {unit} are too few to hold out {test_fraction:.0%}")
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

    def digest(self) -> str:
        """A short hash of every part and the classes: what a stored probe grid was fitted and scored on."""
        parts = [self.train, self.validation, self.test, *([] if self.classes is None else [self.classes])]
        return hashlib.blake2b(b"|".join(np.asarray(p, dtype=np.int64).tobytes() for p in parts),
                               digest_size=8).hexdigest()

    @property
    def fit(self) -> np.ndarray:
        """The training sequences gradient steps are taken on (train without validation)."""
        return np.setdiff1d(self.train, self.validation)

    @classmethod
    def of(cls, tokens: np.ndarray, test_fraction: float, validation_fraction: float, seed: int,
           top_k: int | None = None, clusters: np.ndarray | None = None) -> ProbeSplit:
        """Split the sequences of ``tokens`` [n, T] by their ``clusters`` [n] (None: each sequence its own), the
        fractions counted in clusters; with ``top_k``, the classes are its training split's ``top_k`` most
        frequent tokens."""
        unit = "sequences" if clusters is None else "held-out documents (clusters of sequences)"
        clusters = np.arange(len(tokens)) if clusters is None else np.asarray(clusters)
        if len(clusters) != len(tokens):
            raise ForethoughtError(f"{len(tokens)} sequences but {len(clusters)} cluster ids")
        names = np.unique(clusters)
        train, test = split_sequences(len(names), test_fraction, seed=seed, unit=unit)
        n_validation = max(1, round(len(train) * validation_fraction))
        validation = np.random.default_rng(seed).permutation(train)[:n_validation]

        def members(parts: np.ndarray) -> np.ndarray:  # cluster indices → their sequences, sorted
            return np.flatnonzero(np.isin(clusters, names[parts]))

        train_sequences = members(train)
        classes = None if top_k is None else top_classes(np.asarray(tokens)[train_sequences], top_k)
        return cls(train_sequences, members(validation), members(test), classes)
