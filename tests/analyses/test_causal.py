"""The causal test's controls: the shuffled-label control is LEACE of a concept h does not hold — seeded, of the
edit's rank, and leaving the real concept readable — and a control not named is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forethought.analyses.causal import LEACE, RANDOM, SHUFFLED, check_controls, erasers, shuffled_fit
from forethought.core.errors import ForethoughtError
from forethought.probes.erasure import ErasureFit, linear_r2

CLASSES = 5


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 48 dimensions whose class is written along the first 4 (one-hot means), in unit noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    means = np.random.default_rng(99).normal(size=(CLASSES, 48)) * np.r_[np.full(4, 2.0), np.zeros(44)]
    return means[labels] + rng.normal(size=(n, 48)), labels


def test_the_shuffled_control_erases_an_unrelated_concept_and_leaves_the_real_one_readable():
    (h, labels), (h_test, labels_test) = planted(6000, 0), planted(3000, 1)
    fit = ErasureFit.from_samples(h, labels, CLASSES)
    unrelated = shuffled_fit(h, labels, CLASSES, seed=3)
    made = erasers(fit, fit.max_rank, 3, (RANDOM, SHUFFLED), unrelated)
    assert set(made) == {LEACE, RANDOM, SHUFFLED} and made[SHUFFLED].rank == made[LEACE].rank == CLASSES - 1

    def r2_after(name: str) -> float:
        erase = made[name]
        return linear_r2(erase(torch.from_numpy(h)).numpy(), labels, erase(torch.from_numpy(h_test)).numpy(),
                         labels_test)

    before = linear_r2(h, labels, h_test, labels_test)
    assert before > 0.4 and r2_after(LEACE) < 0.002  # the concept's erasure removes it …
    assert r2_after(SHUFFLED) > before - 0.1  # … its unrelated twin of the same rank leaves it readable
    again = shuffled_fit(h, labels, CLASSES, seed=3).eraser(2)  # seeded: the same draw, another seed another one
    assert torch.equal(again.right, unrelated.eraser(2).right)
    assert not torch.allclose(shuffled_fit(h, labels, CLASSES, seed=4).eraser(2).right, again.right)
    assert set(erasers(fit, 2, 3)) == {LEACE, RANDOM}  # by default the random control alone (synthetic)
    with pytest.raises(ForethoughtError, match="the shuffled control needs the unrelated concept's fit"):
        erasers(fit, 2, 3, (SHUFFLED,))


@pytest.mark.parametrize("controls, message", [
    ((), "unknown control (none given); choose from random, shuffled"),
    (("random", "probe"), "unknown control probe; choose from random, shuffled"),
])
def test_unknown_controls_are_refused(controls, message):
    with pytest.raises(ForethoughtError, match=rf"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        check_controls(controls)
