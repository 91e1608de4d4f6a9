"""Tiny random models built from configs: nothing downloads, everything runs in seconds on a CPU."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub

import pytest  # noqa: E402
import torch  # noqa: E402

from models.gpt2 import build_lm, build_regression, gpt2_config, regression_config

VOCAB = 23


@pytest.fixture
def tiny_lm():
    """A 3-layer float64 token LM (d_model 16, 4 heads, vocabulary 23) in eval mode."""
    config = gpt2_config(n_layer=3, d_model=16, n_head=4, vocab_size=VOCAB, n_positions=32)
    return build_lm(config, seed=0).double().eval()


@pytest.fixture
def tiny_regression():
    """A 3-layer float64 regression model (in_dim 2, out_dim 1) in eval mode."""
    config = regression_config(in_dim=2, out_dim=1, n_layer=3, d_model=16, n_head=2, n_positions=32)
    return build_regression(config, seed=0).double().eval()


@pytest.fixture
def tokens():
    """[batch 3, seq 7] token ids."""
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
