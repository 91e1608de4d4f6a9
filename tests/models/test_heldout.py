"""Held-out evaluation: per-token losses."""

from __future__ import annotations

import pytest
import torch

from forethought.models.heldout import token_losses
from forethought.models.tasks.text import TextTask


def test_token_losses_are_the_training_loss(tiny_lm):
    tokens = torch.randint(0, 23, (5, 9), generator=torch.Generator().manual_seed(4))
    losses = token_losses(tiny_lm, tokens, batch_size=2)
    assert losses.shape == (5, 8)
    assert losses.mean() == pytest.approx(TextTask(tokens.numpy()).loss(tiny_lm, tokens, tokens).item(), rel=1e-6)
