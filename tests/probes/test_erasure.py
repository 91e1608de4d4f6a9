"""Concept erasure: a planted concept is unreadable after full-rank erasure, ranks cut the most decodable
directions first, and the random control matches the edit in rank and whitened variance without seeing the
concept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from forethought.core.errors import ForethoughtError
from forethought.probes.erasure import ErasureFit, linear_r2, mlp_gain
from forethought.probes.interventions import intervene

D, CLASSES = 16, 5


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose class is written along 4 directions (strongly along one), in correlated noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    means = np.random.default_rng(99).normal(size=(CLASSES, D)) * np.r_[3.0, 1.0, 1.0, 1.0, np.zeros(D - 4)]
    mixing = np.random.default_rng(98).normal(size=(D, D)) / np.sqrt(D)
    return means[labels] + rng.normal(size=(n, D)) @ mixing + 0.5, labels


def probe_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    return LogisticRegression(max_iter=2000).fit(*train).score(*test)


def test_full_rank_erasure_leaves_a_fresh_linear_probe_at_chance():
    (h, labels), (h_test, labels_test) = planted(4000, 0), planted(2000, 1)
    fit = ErasureFit.from_samples(h, labels, CLASSES)
    assert fit.max_rank == CLASSES - 1  # one-hot classes centred: k − 1 directions
    chance = np.bincount(labels_test).max() / len(labels_test)
    assert probe_accuracy((h, labels), (h_test, labels_test)) > 0.9
    eraser = fit.eraser()
    erase = lambda x: eraser(torch.from_numpy(x)).numpy()  # noqa: E731
    assert probe_accuracy((erase(h), labels), (erase(h_test), labels_test)) < chance + 0.04
    # a rank-1 erasure leaves the weaker directions readable; the control of that rank, most of the concept
    partial, control = fit.eraser(1), fit.random_eraser(1, seed=0)
    erased_1 = probe_accuracy((partial(torch.from_numpy(h)).numpy(), labels),
                              (partial(torch.from_numpy(h_test)).numpy(), labels_test))
    kept = probe_accuracy((control(torch.from_numpy(h)).numpy(), labels),
                          (control(torch.from_numpy(h_test)).numpy(), labels_test))
    assert chance + 0.04 < erased_1 < kept


def test_the_control_matches_rank_and_whitened_variance_and_ignores_the_concept():
    h, labels = planted(3000, 2)
    fit = ErasureFit.from_samples(h, labels, CLASSES, shrinkage=False)
    white = (torch.from_numpy(h) - fit.mean) @ fit.whiten  # whitened rows: identity covariance
    for rank in (1, 3):
        concept, control = fit.eraser(rank), fit.random_eraser(rank, seed=7)
        assert concept.rank == control.rank == rank
        for eraser in (concept, control):  # whitened variance removed = rank (the basis is orthonormal there)
            removed = white @ (eraser.right @ fit.unwhiten).T
            assert float((removed**2).sum(-1).mean()) * len(h) / (len(h) - 1) == pytest.approx(rank, rel=1e-6)
    for rank in (1, 3):  # matched to the concept edit: the raw variance removed too, and still rank, whitened r
        concept = fit.eraser(rank)
        matched = fit.random_eraser(rank, seed=7, like=concept)
        isotropic = fit.random_eraser(rank, seed=7)
        assert matched.rank == rank and concept.removed_variance(h) > 1.5 * isotropic.removed_variance(h)
        assert matched.removed_variance(h) == pytest.approx(concept.removed_variance(h), rel=1e-6)
        removed = white @ (matched.right @ fit.unwhiten).T
        assert float((removed**2).sum(-1).mean()) * len(h) / (len(h) - 1) == pytest.approx(rank, rel=1e-6)
        assert not torch.allclose(matched.right, concept.right, atol=1e-3)  # other directions
    shuffled = ErasureFit.from_samples(h, np.random.default_rng(3).permutation(labels), CLASSES, shrinkage=False)
    assert torch.equal(shuffled.random_eraser(2, seed=7).right, fit.random_eraser(2, seed=7).right)  # no concept
    assert not torch.equal(fit.random_eraser(2, seed=8).right, fit.random_eraser(2, seed=7).right)  # the seed does


def correlated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows holding a and b (5 classes each; b = a half the time, else uniform), each along its own directions."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, CLASSES, n)
    b = np.where(rng.random(n) < 0.5, a, rng.integers(0, CLASSES, n))
    means_a, means_b = (np.random.default_rng(s).normal(size=(CLASSES, D)) for s in (97, 96))
    mixing = np.random.default_rng(98).normal(size=(D, D)) / np.sqrt(D)
    return means_a[a] + means_b[b] + rng.normal(size=(n, D)) @ mixing, a, b


def test_erasing_beyond_a_correlated_concept_keeps_its_readout_exactly_and_removes_the_rest():
    h, a, b = correlated(6000, 3)
    fit_a, fit_b = (ErasureFit.from_samples(h, labels, CLASSES, shrinkage=False) for labels in (a, b))
    design = np.c_[h, np.ones(len(h))]
    coefficients = np.linalg.lstsq(design, np.eye(CLASSES)[a], rcond=None)[0]  # a's least-squares readout
    readout = lambda x: np.c_[x, np.ones(len(x))] @ coefficients  # noqa: E731
    erase = lambda eraser: eraser(torch.from_numpy(h)).numpy()  # noqa: E731
    assert np.abs(readout(erase(fit_b.eraser())) - readout(h)).max() > 0.05  # plain LEACE of b moves a's readout
    beyond = fit_b.beyond(fit_a)
    assert beyond.max_rank == fit_b.max_rank  # b's directions are not a's: none lost, each turned off a's
    for eraser in (beyond.eraser(), beyond.random_eraser(2, seed=0, like=beyond.eraser(2))):
        np.testing.assert_allclose(readout(erase(eraser)), readout(h), atol=1e-9)
    # what a linear probe still reads of b is what a's whitened coordinates tell about it, no more
    through_a = ((torch.from_numpy(h) - fit_a.mean) @ fit_a.whiten @ fit_a.directions).numpy()
    left = linear_r2(erase(beyond.eraser()), b, erase(beyond.eraser()), b)
    assert left == pytest.approx(linear_r2(through_a, b, through_a, b), abs=0.01)
    assert 0.05 < left < linear_r2(h, b, h, b) - 0.2
    with pytest.raises(ForethoughtError, match="same residual rows"):
        fit_b.beyond(ErasureFit.from_samples(h[:-1], a[:-1], CLASSES))


def test_rank_zero_is_the_identity_and_ranks_beyond_the_concept_are_capped():
    h, labels = planted(500, 4)
    fit = ErasureFit.from_samples(h, labels, CLASSES)
    assert torch.equal(fit.eraser(0)(torch.from_numpy(h)), torch.from_numpy(h))
    assert fit.eraser(D).rank == fit.random_eraser(D, seed=0).rank == fit.max_rank
    with pytest.raises(ForethoughtError, match=r"erasure rank 17 is outside 0 … 16"):
        fit.eraser(D + 1)
    with pytest.raises(ForethoughtError, match=r"labels in 0 … 4"):
        ErasureFit.from_samples(h, labels + 1, CLASSES)
    with pytest.raises(ForethoughtError, match=r"one concept value per row, got \(500, 16\) and 499"):
        ErasureFit.from_values(h, labels[:-1])


def test_a_continuous_concept_is_erased_to_no_linear_correlation():
    rng = np.random.default_rng(5)
    x = rng.normal(size=4000)
    h = np.c_[np.sin(3 * x), rng.normal(size=(4000, 7))] @ rng.normal(size=(8, 8))  # sin(3x) mixed into 8 dims
    fit = ErasureFit.from_values(h, np.sin(3 * x), shrinkage=False)
    assert fit.max_rank == 1
    erased = fit.eraser()(torch.from_numpy(h)).numpy()
    assert least_squares_r2(h, np.sin(3 * x)) > 0.99 and least_squares_r2(erased, np.sin(3 * x)) < 1e-20


def least_squares_r2(features: np.ndarray, target: np.ndarray) -> float:
    """In-sample R² of the least-squares fit of ``target`` on ``features`` with an intercept."""
    design = np.c_[features, np.ones(len(features))]
    residual = target - design @ np.linalg.lstsq(design, target, rcond=None)[0]
    return 1 - residual.var() / target.var()


def test_an_eraser_edits_a_model_at_one_layer_and_position(tiny_lm):
    tokens = torch.randint(0, tiny_lm.config.vocab_size, (6, 9), generator=torch.Generator().manual_seed(0))
    hidden = tiny_lm(tokens, output_hidden_states=True).hidden_states[1].detach()  # h[1] [6, 9, d]
    fit = ErasureFit.from_samples(hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1) % 3, 3)
    with intervene(tiny_lm, fit.eraser().at(1, positions=4)) as edited:
        tiny_lm(tokens)
    expected = hidden.clone()
    expected[:, 4] = fit.eraser()(hidden[:, 4])
    torch.testing.assert_close(edited[1], expected, rtol=0, atol=1e-6)


def test_the_checks_see_what_survives_a_linear_erasure():
    """A concept written twice — linearly along h2 and as the XOR of the signs of h0 and h1: full-rank LEACE
    removes the linear copy (the linear check then reads nothing) and leaves the XOR, which the one-hidden-layer
    probe recovers; labels unrelated to h give that probe nothing."""
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 6000)
    h = rng.normal(size=(6000, 6))
    h[:, 1] = np.abs(h[:, 1]) * np.where((h[:, 0] > 0) ^ (labels == 1), 1, -1)  # sign(h0) xor sign(h1) = label
    h[:, 2] = labels + 0.5 * rng.normal(size=6000)
    train, test = slice(0, 4000), slice(4000, None)
    assert linear_r2(h[train], labels[train], h[test], labels[test]) > 0.4  # var(z) / (var(z) + 0.25) = 0.5
    erased = ErasureFit.from_samples(h[train], labels[train], 2).eraser()(torch.from_numpy(h)).numpy()
    assert linear_r2(erased[train], labels[train], erased[test], labels[test]) < 0.01
    assert mlp_gain(erased[train], labels[train], erased[test], labels[test], seed=0) > 0.3  # of ln 2 = 0.69
    unrelated = rng.integers(0, 2, 6000)
    assert abs(mlp_gain(h[train], unrelated[train], h[test], unrelated[test], seed=0)) < 0.05
