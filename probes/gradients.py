"""Gradients that reach the residual stream, and the future-gradient share.

Future-gradient share (any single checkpoint): at residual layer l, ‖g_total − g_own‖ / ‖g_total‖ over
positions and sequences, where g_total is the gradient of the summed next-token loss reaching h[l, t] and
g_own the part from position t's own loss — the gradient under :func:`models.myopic.myopic`. It says how much
of the training signal at each layer asks for computation on behalf of later positions.
"""

from __future__ import annotations

import numpy as np
import torch

from forethought.models.heldout import device_batches
from forethought.models.myopic import myopic
from forethought.models.tasks.text import next_token_loss
from forethought.probes.metrics import Estimate, bootstrap
from forethought.probes.residuals import capture_residuals


def residual_gradients(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [batch, T] → gradient of the summed next-token loss at every residual layer [L+1, batch, T, d].

    Under :func:`models.myopic.myopic`, h[l, t] receives only position t's own loss. The token embeddings enter
    as a leaf that requires grad, so every h[l] does even where the embedding weights are frozen (a Llama's
    h[0] is its token embeddings alone).
    """
    embeddings = model.get_input_embeddings()(tokens).detach().requires_grad_()
    with capture_residuals(model, retain_grad=True) as captured:
        logits = model(inputs_embeds=embeddings, use_cache=False).logits
        next_token_loss(logits, tokens, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return torch.stack([captured[layer].grad for layer in sorted(captured)])


def future_gradient_stats(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 16,
                          progress: bool = False) -> np.ndarray:
    """Per-sequence sufficient statistics [n, 2·(L+1)]: ‖g_total − g_own‖² and ‖g_total‖² per layer."""
    stats = []
    for chunk in device_batches(model, sequences, batch_size, "gradient share", progress):
        total = residual_gradients(model, chunk).double()  # [L+1, b, T, d]
        with myopic(model):
            own = residual_gradients(model, chunk).double()
        future = (total - own).pow(2).sum((2, 3))  # [L+1, b]
        stats.append(torch.cat([future, total.pow(2).sum((2, 3))]).T.cpu())  # [b, 2·(L+1)]
    return torch.cat(stats).numpy()


def future_gradient_share(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 16,
                          seed: int = 0, progress: bool = False) -> list[Estimate]:
    """The future-gradient share of each residual layer 0 … L, with 95 % bootstrap CIs over sequences."""
    stats = future_gradient_stats(model, sequences, batch_size, progress)
    n_layers = stats.shape[1] // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return bootstrap(stats, lambda s: np.sqrt(s[..., :n_layers] / s[..., n_layers:]),
                         n_examples=len(stats) * sequences.shape[1], seed=seed)
