"""Gradients that reach the residual stream, split into a position's own part and the later positions' part.

At residual layer l the gradient of the summed next-token loss reaching h[l, t] is g_total = g_own + g_future:
g_own from position t's own loss (the gradient under :func:`models.myopic.myopic`), g_future from every later
position's. Per layer, pooled over positions and sequences (sums first, then the ratio):

- the **future share** ‖g_future‖² / (‖g_own‖² + ‖g_future‖²): the later positions' part of the training signal's
  squared norm, what a myopic gradient removes;
- the **cosine** ⟨g_own, g_future⟩ / (‖g_own‖ ‖g_future‖): whether the two parts ask for the same change
  (‖g_total‖² = ‖g_own‖² + ‖g_future‖² + 2⟨g_own, g_future⟩; undefined at the last layer, where g_future = 0).

Until issue 26 the reported "share" was the norm ratio ‖g_future‖ / ‖g_total‖, which reads 0.18 for orthogonal
parts whose future one holds 3 % of the squared norm; the metrics here have new names, so the two never mix.
"""

from __future__ import annotations

import numpy as np
import torch

from forethought.models.heldout import device_batches
from forethought.models.myopic import myopic
from forethought.models.tasks.text import next_token_loss
from forethought.probes.metrics import Estimate, bootstrap, per_cluster_sums
from forethought.probes.residuals import capture_residuals

SHARE = "future_squared_share"  # the results tables' metric names
COSINE = "own_future_cosine"


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
    """Per-sequence sums over positions [n, 3·(L+1)]: ‖g_own‖², ‖g_future‖², then ⟨g_own, g_future⟩, each per
    layer."""
    stats = []
    for chunk in device_batches(model, sequences, batch_size, "gradient split", progress):
        total = residual_gradients(model, chunk).double()  # [L+1, b, T, d]
        with myopic(model):
            own = residual_gradients(model, chunk).double()
        future = total - own
        sums = [own.pow(2).sum((2, 3)), future.pow(2).sum((2, 3)), (own * future).sum((2, 3))]  # [L+1, b] each
        stats.append(torch.cat(sums).T.cpu())  # [b, 3·(L+1)]
    return torch.cat(stats).numpy()


def future_gradient_split(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 16, seed: int = 0,
                          progress: bool = False, clusters: np.ndarray | None = None
                          ) -> dict[str, dict[int, Estimate]]:
    """{:data:`SHARE`: {layer: the future share}, :data:`COSINE`: {layer: cos(g_own, g_future)}} for residual
    layers 0 … L of ``sequences`` [n, T], with 95 % bootstrap intervals over ``clusters`` [n] of the sequences
    (None: over sequences)."""
    stats = future_gradient_stats(model, sequences, batch_size, progress)
    if clusters is not None:
        stats = per_cluster_sums(stats, clusters)
    n_layers = stats.shape[1] // 3

    def share_and_cosine(sums: np.ndarray) -> np.ndarray:  # [..., 3·(L+1)] → [..., 2·(L+1)]
        own, future, cross = (sums[..., k * n_layers : (k + 1) * n_layers] for k in range(3))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.concatenate([future / (own + future), cross / np.sqrt(own * future)], axis=-1)

    estimates = bootstrap(stats, share_and_cosine, n_examples=len(sequences) * sequences.shape[1], seed=seed)
    return {SHARE: dict(enumerate(estimates[:n_layers])), COSINE: dict(enumerate(estimates[n_layers:]))}
