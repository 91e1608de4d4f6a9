"""Count baselines for future-token probes, from the training sequences' tokens alone (no model).

- ``unigram``: always the counted tokens' frequencies;
- ``skip-bigram``: the frequencies of x[t+τ] after x[t] in the counted tokens (a τ-skip bigram table),
  falling back to the unigram where x[t] was never seen.

The counted tokens are the model's own training sequences where they are known (what count statistics of
the same data achieve), else the probes' training split of the held-out sequences.

Both are add-α smoothed over the vocabulary, scored on the same held-out positions as the probes
(t < T − max τ) with top-1, top-5 and cross-entropy and 95 % bootstrap intervals over held-out clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix

from forethought.core.offsets import at_offset
from forethought.probes.metrics import mean_scores, text_groups


@dataclass
class BaselineScores:
    """Per-example held-out scores of the count baselines: ``values[probe][τ]`` [n, 3] = (top-1 hit, top-5 hit,
    cross-entropy) on the probes' examples, in their order (``sequence_ids``), so differences are paired."""

    values: dict[str, dict[int, np.ndarray]]
    sequence_ids: np.ndarray
    clusters: np.ndarray | None = None  # [n] each example's resampling unit (None: its sequence)
    texts: np.ndarray | None = None  # [n] each example's text (tables by text)

    def table(self, by_text: bool = False) -> pd.DataFrame:
        """Tidy rows (probe ∈ unigram, skip-bigram; tau; metric ∈ top1, top5, cross_entropy; split "test"), or with
        ``by_text`` the same per text of a mixed sample (split "test: <text>"; none for one text)."""
        clusters = self.sequence_ids if self.clusters is None else self.clusters
        rows = []
        for split, where in text_groups(self.texts if by_text else None, len(clusters)):
            for probe, by_tau in self.values.items():
                for tau, values in by_tau.items():
                    estimates = mean_scores(values[where], clusters[where])
                    for metric, estimate in zip(("top1", "top5", "cross_entropy"), estimates):
                        rows.append({"probe": probe, "tau": tau, "metric": metric, "split": split,
                                     **estimate.columns()})
        return pd.DataFrame(rows, columns=["probe", "tau", "metric", "split", "value", "ci_low", "ci_high", "n"]
                            ).sort_values("tau", kind="stable").reset_index(drop=True)


def count_baselines(tokens: np.ndarray, train: np.ndarray, test: np.ndarray, taus: Sequence[int],
                    vocab_size: int, alpha: float = 0.1, classes: np.ndarray | None = None,
                    counted: np.ndarray | None = None) -> BaselineScores:
    """The unigram and skip-bigram baselines' scores on every held-out example (positions t < T − max τ of the
    ``test`` sequences of ``tokens`` [n, T]), counted on ``tokens[train]`` or, if given, on ``counted`` [m, T']
    (e.g. the model's training sequences).

    ``classes``: predict only these token ids + "other" (what ``topk`` probes predict), so the numbers compare.
    """
    taus = sorted(set(taus))
    counted = tokens[train] if counted is None else counted
    if classes is not None:
        lookup = np.full(vocab_size, len(classes))
        lookup[classes] = np.arange(len(classes))
        tokens, counted, vocab_size = lookup[tokens], lookup[counted], len(classes) + 1
    positions, counted_positions = tokens.shape[1] - max(taus), counted.shape[1] - max(taus)
    current_train = at_offset(counted, 0, counted_positions).ravel()  # x[t], the skip-bigram's context
    current_test = at_offset(tokens[test], 0, positions).ravel()
    unigram = np.bincount(counted.ravel(), minlength=vocab_size).astype(np.float64)
    values: dict[str, dict[int, np.ndarray]] = {"unigram": {}, "skip-bigram": {}}
    for tau in taus:
        ahead_train = at_offset(counted, tau, counted_positions).ravel()
        ahead_test = at_offset(tokens[test], tau, positions).ravel()
        table = coo_matrix((np.ones(len(current_train)), (current_train, ahead_train)),
                           shape=(vocab_size, vocab_size)).tocsr()
        values["unigram"][tau] = _score_rows(np.zeros(len(ahead_test), dtype=int), ahead_test, lambda _: unigram, alpha)
        values["skip-bigram"][tau] = _score_rows(
            current_test, ahead_test, lambda x, table=table: table[x].toarray()[0] if table[x].nnz else unigram, alpha
        )
    return BaselineScores(values, np.repeat(test, positions))


def _score_rows(contexts: np.ndarray, targets: np.ndarray, counts_for, alpha: float) -> np.ndarray:
    """Per example [n, 3]: top-1 hit, top-5 hit, −log p(target), with p ∝ counts_for(context) + α."""
    values = np.zeros((len(targets), 3))
    for context in np.unique(contexts):
        rows = np.flatnonzero(contexts == context)
        counts = counts_for(context) + alpha
        top5 = np.argpartition(-counts, 4)[:5] if len(counts) > 5 else np.arange(len(counts))
        top5 = top5[np.argsort(-counts[top5], kind="stable")]  # ordered: top5[0] is the top-1 guess
        values[rows, 0] = targets[rows] == top5[0]
        values[rows, 1] = np.isin(targets[rows], top5)
        values[rows, 2] = -np.log(counts[targets[rows]] / counts.sum())
    return values
