"""The own / future split of the gradient is exact against a per-position brute force; its share and cosine are
what they say, on planted sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

from forethought.probes import gradients
from forethought.probes.gradients import COSINE, SHARE, future_gradient_split, future_gradient_stats
from forethought.probes.residuals import capture_residuals


def test_future_gradient_share_matches_per_position_brute_force(tiny_lm):
    tokens = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(3))
    per_loss = []  # per_loss[i]: gradient of ℓ_i (position i predicting token i + 1) at every residual
    for i in range(tokens.shape[1] - 1):
        with capture_residuals(tiny_lm, retain_grad=True) as captured:
            logits = tiny_lm(tokens).logits
            cross_entropy(logits[:, i], tokens[:, i + 1], reduction="sum").backward()
        per_loss.append(torch.stack([captured[layer].grad for layer in sorted(captured)]))
    grads = torch.stack(per_loss)  # [loss position i, L+1, batch, T, d]
    i, t = torch.arange(grads.shape[0])[:, None], torch.arange(tokens.shape[1])[None, :]
    future = (grads * (i > t).double()[:, None, None, :, None]).sum(0)  # losses after t reaching h[l, t]
    own = (grads * (i == t).double()[:, None, None, :, None]).sum(0)  # position t's own loss
    stats = torch.from_numpy(future_gradient_stats(tiny_lm, tokens, batch_size=1)).T  # [3·(L+1), sequences]
    own_sq, future_sq, cross = stats.chunk(3)
    for got, expected in [(own_sq, own.pow(2)), (future_sq, future.pow(2)), (cross, own * future)]:
        torch.testing.assert_close(got, expected.sum((2, 3)), atol=1e-12, rtol=1e-9)
    assert (future_sq[:-1] > 0).all()  # a random model already sends gradient back in time ...
    assert (future_sq[-1] < 1e-20).all()  # ... but never into the last residual layer


def test_share_is_of_the_squared_norm_and_the_cosine_its_angle(monkeypatch):
    """Planted sums: orthogonal parts whose future one holds 3 % of the squared norm give a share of 0.03 (the
    old norm ratio ‖g_future‖ / ‖g_total‖ read 0.17), cosine 0; parallel parts cosine 1, opposite −1."""
    sequences = torch.zeros(4, 5, dtype=torch.long)
    per_sequence = np.array([[0.97, 0.97, 0.97, 0.03, 0.03, 0.03, 0.0, 0.03, -0.03]])  # 3 layers: own², fut², ⟨,⟩
    per_sequence[0, 7] = np.sqrt(0.97 * 0.03)  # layer 1: parallel
    per_sequence[0, 8] = -np.sqrt(0.97 * 0.03)  # layer 2: opposite
    monkeypatch.setattr(gradients, "future_gradient_stats", lambda *args: np.repeat(per_sequence, 4, axis=0))
    split = future_gradient_split(None, sequences)
    assert list(split[SHARE]) == list(split[COSINE]) == [0, 1, 2]  # labelled by residual layer
    assert [e.value for e in split[SHARE].values()] == pytest.approx([0.03, 0.03, 0.03])
    assert [e.value for e in split[COSINE].values()] == pytest.approx([0.0, 1.0, -1.0])
    assert split[SHARE][0].n == 4 * 5 and split[SHARE][0].ci_low == pytest.approx(0.03)  # identical sequences
