"""What differs between causal-LM families (GPT-2, Llama, GPT-NeoX, …), in one place: where the decoder blocks,
the final norm and the unembedding live, which self-attention class the myopic gradient patches and its key/value
projections, and the sizes an analysis needs.

Everything else reads models through this table and these functions, so supporting a family is a change here.
Tested on GPT-2, Llama, Mistral, Qwen2 and GPT-NeoX (tiny random configs); other families whose Hugging Face module
names match (``*.h`` / ``*.layers`` blocks, ``ln_f`` / ``norm`` / ``final_layer_norm``) are read the same way, but
are not made myopic.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from forethought.core.errors import ForethoughtError


@dataclass(frozen=True)
class Family:
    """Where a family keeps what the workbench reads or patches (attribute names on the base model)."""

    blocks: str  # the decoder blocks
    final_norm: str  # the norm before the unembedding
    attention: str  # the self-attention class the myopic gradient patches
    key_value: tuple[str, ...]  # that class's key/value projections (GPT-NeoX: the fused q|k|v; GPT-2: c_attn)


FAMILIES: dict[str, Family] = {  # by config.model_type
    "gpt2": Family("h", "ln_f", "GPT2Attention", ("c_attn",)),
    "llama": Family("layers", "norm", "LlamaAttention", ("k_proj", "v_proj")),
    "mistral": Family("layers", "norm", "MistralAttention", ("k_proj", "v_proj")),
    "qwen2": Family("layers", "norm", "Qwen2Attention", ("k_proj", "v_proj")),
    "gpt_neox": Family("layers", "final_layer_norm", "GPTNeoXAttention", ("query_key_value",)),
}
_BLOCKS = tuple(dict.fromkeys(f.blocks for f in FAMILIES.values()))  # for families not in the table
_FINAL_NORMS = tuple(dict.fromkeys(f.final_norm for f in FAMILIES.values()))


def decoder_blocks(model: PreTrainedModel) -> nn.ModuleList:
    """The model's decoder blocks, in order (block l maps residual h[l] to h[l + 1])."""
    return _first_attribute(model.base_model, _BLOCKS, "decoder blocks")


def unembedding(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    """(final norm, unembedding): what turns the last residual h[L] into logits — the logit lens's readout."""
    return _first_attribute(model.base_model, _FINAL_NORMS, "final norm"), model.get_output_embeddings()


def n_layers(config: PretrainedConfig) -> int:
    """Number of decoder blocks L (residual layers are 0 … L)."""
    return config.num_hidden_layers


def non_embedding_parameters(model: PreTrainedModel) -> int:
    """Parameters outside the token / position embeddings and the unembedding (Kaplan et al.'s N, the size
    measure of scaling trends)."""
    embeddings = [model.get_input_embeddings(), model.get_output_embeddings(), getattr(model.base_model, "wpe", None)]
    excluded = {id(p) for module in embeddings if module is not None for p in module.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)


def architecture(config: PretrainedConfig) -> str:
    """The model class a config describes, e.g. ``GPT2LMHeadModel`` or ``LlamaForCausalLM``."""
    return (config.architectures or [type(config).__name__.removesuffix("Config")])[0]


def architecture_summary(config: PretrainedConfig) -> dict[str, object]:
    """The settings that make two models the same architecture (twins must agree on all of them)."""
    keys = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "n_inner",
        "vocab_size",
        "max_position_embeddings",
        "activation_function",
        "hidden_act",
    )
    return {key: value for key in keys if (value := getattr(config, key, None)) is not None}


def _first_attribute(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        if isinstance(found := getattr(module, name, None), nn.Module):
            return found
    raise ForethoughtError(f"{type(module).__name__} has no {what} under a known name ({', '.join(names)})")
