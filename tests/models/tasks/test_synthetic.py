"""The synthetic task's targets follow the paper's formula, checked by a direct loop."""

from __future__ import annotations

import math

import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.models.tasks.synthetic import SyntheticTask


def test_targets_follow_the_formula():
    task = SyntheticTask(p=0.5, n_terms=3, freq=10.0, seq_len=9)
    inputs, targets = task.sample(4, torch.Generator().manual_seed(0))
    assert inputs.shape == (4, 9, 2) and targets.shape == (4, 9)
    for b in range(4):
        for t in range(9):
            x, z = inputs[b, t]
            past = sum(math.sin(10 * inputs[b, t - i, 0].item()) for i in range(1, 4) if t - i >= 0)
            expected = past if z == 1 else x.item()
            assert targets[b, t].item() == pytest.approx(expected, abs=1e-5)


def test_samples_are_fresh_and_seeded():
    task = SyntheticTask(seq_len=16)
    generator = torch.Generator().manual_seed(0)
    first, second = task.sample(8, generator)[0], task.sample(8, generator)[0]
    assert not torch.equal(first, second)
    assert torch.equal(first, task.sample(8, torch.Generator().manual_seed(0))[0])


def test_bernoulli_rate_and_trivial_baseline():
    task = SyntheticTask(p=0.3, seq_len=64)
    inputs, targets = task.sample(2000, torch.Generator().manual_seed(1))
    assert inputs[..., 1].mean().item() == pytest.approx(0.3, abs=0.01)
    paper = SyntheticTask()  # p = 1, the paper's trivial Huber loss is 1.257
    _, paper_targets = paper.sample(2000, torch.Generator().manual_seed(2))
    assert paper.trivial_loss(paper_targets).item() == pytest.approx(1.257, abs=0.02)


def test_features_are_lagged_inputs():
    task = SyntheticTask(freq=5.0, seq_len=6)
    inputs, _ = task.sample(2, torch.Generator().manual_seed(0))
    features = task.features(inputs, lookback=2)
    assert torch.isnan(features["x"][:, :2]).all()
    torch.testing.assert_close(features["x"][:, 2:], inputs[:, :4, 0])
    torch.testing.assert_close(features["sin"][:, 2:], torch.sin(5 * inputs[:, :4, 0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"p": 1.5}, r"p must lie in \[0, 1\], got 1.5"), ({"seq_len": 1}, "seq_len must be at least 2")],
)
def test_bad_task_settings_are_named(kwargs, message):
    with pytest.raises(ForethoughtError, match=message):
        SyntheticTask(**kwargs)
