"""Both residual routes (TransformerBridge hooks, HF forward hooks) give the same tensors, on every family."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from forethought.core.errors import ForethoughtError
from forethought.probes.residuals import bridge_residuals, load_bridge, model_residuals, read_layers
from tests.conftest import tiny_family


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


def _saved_with_a_tokenizer(model, folder):
    """``model`` saved in ``folder`` with a word-level tokenizer over its 23 ids (what the bridge boots from)."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(23)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", eos_token="t1").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "neox"])
def test_the_caching_route_reads_what_the_bridge_reads_on_every_family(family, tmp_path):
    """The forward hooks caching uses (read_layers) against TransformerLens's bridge at the same hook names."""
    model = tiny_family(family)
    tokens = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(4))
    via_bridge = bridge_residuals(load_bridge(_saved_with_a_tokenizer(model, tmp_path), dtype=torch.float64), tokens)
    via_hooks = read_layers(model, tokens, [0, 1, 2])
    torch.testing.assert_close(via_bridge, torch.stack([via_hooks[layer] for layer in range(3)]), atol=1e-8, rtol=0)


def test_the_forward_pass_stops_at_the_deepest_layer_asked_for(tiny_lm, tokens):
    """Blocks past it, the final norm and the unembedding never run; the layers read are those of a full pass."""
    ran = []
    handles = [module.register_forward_hook(lambda module, *_: ran.append(module))
               for module in (*tiny_lm.transformer.h, tiny_lm.transformer.ln_f, tiny_lm.lm_head)]
    try:
        read = read_layers(tiny_lm, tokens, [0, 1])
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [tiny_lm.transformer.h[0]] and set(read) == {0, 1}
    full = tiny_lm(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(read[1], full[1], atol=0, rtol=0)


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


def test_reading_is_in_eval_mode_and_leaves_the_models_mode_as_it_was(tokens):
    from forethought.models.gpt2 import build_lm, gpt2_config

    model = build_lm(gpt2_config(n_layer=2, d_model=16, n_head=2, vocab_size=23, n_positions=16, dropout=0.5), seed=0)
    model.train()
    first, again = read_layers(model, tokens, [2]), read_layers(model, tokens, [2])
    assert model.training  # still training
    torch.testing.assert_close(first[2], again[2], atol=0, rtol=0)  # no dropout in what was read
    torch.testing.assert_close(first[2], model_residuals(model.eval(), tokens, [2])[0], atol=0, rtol=0)
