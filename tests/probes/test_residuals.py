"""Both residual routes (TransformerBridge hooks, HF forward hooks) give the same tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from forethought.core.errors import ForethoughtError
from forethought.probes.residuals import bridge_residuals, load_bridge, model_residuals


def test_bridge_and_model_routes_agree(tiny_lm, tokens, lm_folder):
    bridge = load_bridge(lm_folder, dtype=torch.float64)
    via_bridge = bridge_residuals(bridge, tokens)
    via_model = model_residuals(tiny_lm.double(), tokens)
    assert via_bridge.shape == (4, 3, 7, 16)
    torch.testing.assert_close(via_bridge, via_model, atol=1e-10, rtol=0)
    # conventions: layer 0 = embeddings, layer L = before the final LayerNorm
    embeddings = tiny_lm.transformer.wte(tokens) + tiny_lm.transformer.wpe(torch.arange(7))
    torch.testing.assert_close(via_model[0], embeddings)
    final = tiny_lm.transformer(tokens).last_hidden_state
    torch.testing.assert_close(tiny_lm.transformer.ln_f(via_model[3]), final)


def test_both_routes_agree_on_a_llama(llama_folder):
    """Rotary positions, grouped-query attention, RMSNorm: the bridge and the decoder-block hooks still agree."""
    model = AutoModelForCausalLM.from_pretrained(llama_folder).double().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    via_bridge = bridge_residuals(load_bridge(llama_folder, dtype=torch.float64), tokens)
    via_model = model_residuals(model, tokens)
    assert via_bridge.shape == (3, 2, 9, 32)
    torch.testing.assert_close(via_bridge, via_model, atol=1e-7, rtol=0)  # eager vs sdpa attention kernels
    torch.testing.assert_close(via_model[0], model.model.embed_tokens(tokens))  # no BOS added, nothing shifted
    hidden = model(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(model.model.norm(via_model[2]), hidden[2])  # HF's last entry: after the norm


def test_layer_subsets_match_the_full_stack(tiny_lm, tokens, lm_folder):
    bridge = load_bridge(lm_folder, dtype=torch.float64)
    full = bridge_residuals(bridge, tokens)
    torch.testing.assert_close(bridge_residuals(bridge, tokens, layers=[0, 2]), full[[0, 2]])
    torch.testing.assert_close(bridge_residuals(bridge, tokens, layers=[0]), full[[0]])
    torch.testing.assert_close(model_residuals(tiny_lm.double(), tokens, layers=[1]), full[[1]], atol=1e-10, rtol=0)


def test_regression_model_residuals(tiny_regression):
    inputs = torch.randn(2, 5, 2, dtype=torch.float64)
    residuals = model_residuals(tiny_regression, inputs)
    assert residuals.shape == (4, 2, 5, 16)
    embeddings = tiny_regression.read_in(inputs) + tiny_regression.transformer.wpe(torch.arange(5))
    torch.testing.assert_close(residuals[0], embeddings)


def test_bad_layers_and_sources_are_named(tiny_lm, tokens, tmp_path):
    with pytest.raises(ForethoughtError, match=r"layers \[4\] out of range: .* 0 … 3"):
        model_residuals(tiny_lm, tokens, layers=[4])
    with pytest.raises(ForethoughtError, match="cannot boot a TransformerBridge"):
        load_bridge(tmp_path / "missing")
