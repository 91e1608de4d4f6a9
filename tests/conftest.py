"""Tiny random models built from configs: nothing downloads, everything runs in seconds on a CPU."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
SESSION_CACHE = tempfile.mkdtemp(prefix="forethought-tests-")  # converted models: not in ~/.cache (removed at the end)
os.environ["FORETHOUGHT_CACHE"] = SESSION_CACHE
os.environ["FORETHOUGHT_PNG"] = "0"  # no PNG export (~2.5 s of Chromium each) but where a test asks for it

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from forethought.models.gpt2 import build_lm, build_regression, gpt2_config, regression_config  # noqa: E402

VOCAB = 23


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's model cache (~0.5 GB once SmolLM2 is converted) goes with the session."""
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


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


LLAMA_TEXT = ["the river runs past the hill and the hill looks over the river",
              "a quick brown fox jumps over the lazy dog by the river"]


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A tiny random Llama (2 layers, d_model 32, 4 heads / 2 KV heads, rotary, tied embeddings) saved with a
    byte-level BPE tokenizer (~300 tokens, BOS ``<s>``) — a SmolLM2 in miniature."""
    from tokenizers import decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(LLAMA_TEXT * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_gguf(llama_folder, tmp_path_factory):
    """The tiny Llama written as an unquantised GGUF file."""
    from tests.gguf_files import write_llama_gguf

    return write_llama_gguf(llama_folder, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def llama_text(tmp_path_factory):
    """A local corpus of the tiny Llama's words (its BPE knows them): 400 paragraphs of 30 words."""
    words = " ".join(LLAMA_TEXT).split()
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words, size=30)) for _ in range(400)))
    return path


def tiny_family(family: str):
    """A 2-layer float64 model with a vocabulary of 23, in eval mode: Llama (rotary, 4 heads over 2 key/value
    heads), Qwen2 (the same with biased q/k/v projections), Mistral (a sliding window of 4 positions) or GPT-NeoX
    (partial rotary, parallel residual)."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32)
    config, model_class = {
        "llama": (lambda: LlamaConfig(**common, num_key_value_heads=2), LlamaForCausalLM),
        "qwen2": (lambda: Qwen2Config(**common, num_key_value_heads=2), Qwen2ForCausalLM),
        "mistral": (lambda: MistralConfig(**common, num_key_value_heads=2, sliding_window=4), MistralForCausalLM),
        "neox": (lambda: GPTNeoXConfig(**common, rotary_pct=0.5), GPTNeoXForCausalLM),
    }[family]
    return model_class(config()).double().eval()
