"""Count baselines: a deterministic successor is found by the skip-bigram, not the unigram; exact values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from forethought.probes.baselines import count_baselines


def test_skip_bigram_finds_a_deterministic_successor():
    vocab = 9
    starts = np.random.default_rng(0).integers(0, vocab, size=200)
    tokens = (starts[:, None] + np.arange(6)) % vocab  # x[t+τ] = x[t] + τ (mod 9)
    table = count_baselines(tokens, np.arange(150), np.arange(150, 200), taus=[1, 3], vocab_size=vocab).table()
    top1 = table[table["metric"] == "top1"].set_index(["probe", "tau"])["value"]
    assert top1[("skip-bigram", 1)] == 1.0 and top1[("skip-bigram", 3)] == 1.0
    assert top1[("unigram", 1)] < 0.25
    assert (table["n"] == 50 * 3).all()  # positions t < 6 − max τ


def test_values_by_hand():
    tokens = np.array([[0, 1, 0, 1], [0, 1, 1, 1], [1, 1, 0, 0]])
    table = count_baselines(
        tokens, train=np.array([0, 1]), test=np.array([2]), taus=[1], vocab_size=3, alpha=0.5
    ).table()
    value = table.set_index(["probe", "metric"])["value"]
    # unigram over the training tokens: counts (3, 5, 0) + 0.5 → p = (3.5, 5.5, 0.5) / 9.5
    # test pairs (x[t], x[t+1]) for t < 3: (1, 1), (1, 0), (0, 0)
    assert value[("unigram", "top1")] == pytest.approx(1 / 3)
    assert value[("unigram", "cross_entropy")] == pytest.approx(-(np.log(5.5 / 9.5) + 2 * np.log(3.5 / 9.5)) / 3)
    # skip-bigram counts after 0: {1: 3}; after 1: {0: 1, 1: 2}  (+0.5 each)
    after0, after1 = np.array([0.5, 3.5, 0.5]), np.array([1.5, 2.5, 0.5])
    expected = (
        -(np.log(after1[1] / after1.sum()) + np.log(after1[0] / after1.sum()) + np.log(after0[0] / after0.sum())) / 3
    )
    assert value[("skip-bigram", "cross_entropy")] == pytest.approx(expected)
    assert value[("skip-bigram", "top1")] == pytest.approx(1 / 3)  # predicts 1 after 1 (right once), 1 after 0


def test_baselines_over_a_class_subset_pool_the_rest():
    tokens = np.array([[0, 1, 0, 2], [0, 1, 2, 2], [1, 1, 0, 3]])
    pooled = count_baselines(tokens, np.array([0, 1]), np.array([2]), taus=[1], vocab_size=4,
                             classes=np.array([0, 1])).table()
    mapped = np.minimum(tokens, 2)  # classes 0, 1 kept; 2 and 3 become "other" = 2
    direct = count_baselines(mapped, np.array([0, 1]), np.array([2]), taus=[1], vocab_size=3).table()
    pd.testing.assert_frame_equal(pooled, direct)


def test_counted_sequences_replace_the_training_split():
    tokens = np.array([[0, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 0]])
    counted = np.array([[1, 0, 1, 0, 1, 0]])  # elsewhere 1 is always followed by 0, and 0 by 1
    # test pairs (1, 0), (0, 1), (1, 0): the training split (rows 0, 1) predicts 1 after 1 → right once;
    # the counted sequences predict 0 after 1 and 1 after 0 → right every time
    split = count_baselines(tokens, np.array([0, 1]), np.array([2]), taus=[1], vocab_size=3).table()
    elsewhere = count_baselines(
        tokens, np.array([0, 1]), np.array([2]), taus=[1], vocab_size=3, counted=counted
    ).table()

    def top1(table: pd.DataFrame) -> float:
        return table[table["metric"] == "top1"].set_index("probe")["value"]["skip-bigram"]

    assert top1(split) == pytest.approx(1 / 3) and top1(elsewhere) == 1.0
    same = count_baselines(tokens, np.array([0, 1]), np.array([2]), taus=[1], vocab_size=3, counted=tokens[[0, 1]])
    pd.testing.assert_frame_equal(same.table(), split)
