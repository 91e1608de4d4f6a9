"""Tiny random models built from configs: nothing downloads, everything runs in seconds on a CPU."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

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


@pytest.fixture
def lm_folder(tiny_lm, tmp_path):
    """The tiny LM (float32) saved with a word-level tokenizer, as TransformerLens needs."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token=f"w{VOCAB - 1}")
    tiny_lm.float().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path
