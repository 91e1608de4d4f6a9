"""The future-gradient share is exact against a per-position brute force."""

from __future__ import annotations

import torch
from torch.nn.functional import cross_entropy

from forethought.probes.gradients import future_gradient_stats
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
    total = grads.sum(0)
    stats = future_gradient_stats(tiny_lm, tokens, batch_size=1)  # [sequences, 2·(L+1)]
    n_layers = total.shape[0]
    torch.testing.assert_close(
        torch.from_numpy(stats[:, :n_layers]).T, future.pow(2).sum((2, 3)), atol=1e-12, rtol=1e-9
    )
    torch.testing.assert_close(torch.from_numpy(stats[:, n_layers:]).T, total.pow(2).sum((2, 3)), atol=1e-12, rtol=1e-9)
    assert (stats[:, : n_layers - 1] > 0).all()  # a random model already sends gradient back in time ...
    assert (stats[:, n_layers - 1] < 1e-20).all()  # ... but never into the last residual layer
