"""The myopic gradient: no loss at position i sends gradient into another position's hidden state.

Under ``with myopic(model):`` every GPT-2 self-attention layer attends, for every pair i ≠ j, to keys and
values computed from a *detached* copy of position j's attention input (``cut="residual"``, the paper's
definition), or to detached keys and values (``cut="kv"``, stricter: the key/value projections then learn
only from the diagonal). Forward values are unchanged; only the gradient changes. Equivalently, the
gradient is the sum over i of ∂ℓ_i/∂θ with every other position's attention input held constant.

Two implementations:

- ``reference``: the paper's. Materialise the T×T scores of q against the detached keys, overwrite the
  diagonal with the live q_i·k_i, softmax, and add ``diag(A)·(v − ṽ)``. O(T²) memory.
- ``fast`` (the default when it applies: no mask, no attention dropout, and a fused kernel that supports the
  device, dtype and head size — else ``auto`` falls back to ``reference``): flash attention on (q, k̃, ṽ), which also returns the row
  log-sum-exp λ, plus an O(T·d) diagonal correction that is zero in value and routes the diagonal's
  gradient to the live k_i, v_i (DESIGN.md, "Making myopic training as fast as vanilla"):

      o_i += a_ii · ⟨sg q_i, δk_i⟩ · sg(ṽ_i − o_i) + a_ii · δv_i,    a_ii = exp(⟨q_i, k_i⟩·scale − λ_i)

  with δk_i = (k_i − sg k_i) − (k̃_i − sg k̃_i), likewise δv_i. Writing δk as a difference of two exact zeros
  keeps the forward value bit-identical and cancels the gradient flash already sends into k̃_i on the
  diagonal (DESIGN.md's ⟨sg q_i, k_i⟩ alone would count the diagonal's key-weight gradient twice).

k̃, ṽ never need a second projection: :class:`_KeyValueDetachedCopy` returns the live q, k, v from one
matmul plus a copy of k, v whose gradient reaches the projection weights but not the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from models.errors import ForethoughtError

Cut = Literal["residual", "kv"]
Impl = Literal["auto", "fast", "reference"]
CUTS: tuple[str, ...] = ("residual", "kv")
IMPLS: tuple[str, ...] = ("auto", "fast", "reference")


@contextmanager
def myopic(model: nn.Module, cut: Cut = "residual", impl: Impl = "auto") -> Iterator[nn.Module]:
    """Within this context, forward passes of ``model`` produce the myopic gradient.

    Args:
        model: any module holding GPT-2 self-attention layers (``GPT2LMHeadModel``, ``GPT2RegressionModel``).
        cut: ``"residual"`` (the paper's) or ``"kv"`` (also cut the key/value projections of other positions).
        impl: ``"fast"`` (flash attention + diagonal correction), ``"reference"`` (materialised scores), or
            ``"auto"``: fast unless an attention mask, active attention dropout, or a device / dtype / head size
            no fused kernel supports requires the reference.
    """
    if cut not in CUTS:
        raise ForethoughtError(f"unknown myopic cut {cut!r}; choose one of {', '.join(CUTS)}")
    if impl not in IMPLS:
        raise ForethoughtError(f"unknown myopic impl {impl!r}; choose one of {', '.join(IMPLS)}")
    layers = check_myopic_support(model)
    if any("forward" in layer.__dict__ for layer in layers):
        raise ForethoughtError("myopic(): the model is already inside a myopic context (or patched)")
    interfaced = [layer for layer in layers if not isinstance(layer, GPT2Attention)]
    if interfaced and impl == "fast":
        raise ForethoughtError(f"myopic(impl='fast') is implemented for GPT-2 only; {type(interfaced[0]).__name__} "
                               "layers use impl='reference' (or 'auto')")
    configs = list({id(layer.config): layer.config for layer in interfaced}.values())
    implementations = [config._attn_implementation for config in configs]
    for layer in layers:
        layer.forward = _MyopicForward(layer, cut, impl) if isinstance(layer, GPT2Attention) else _InterfaceForward(layer, cut)
    for config in configs:  # their attention function becomes the myopic one (their masks: sdpa's, None when causal)
        config._attn_implementation = _INTERFACE_NAME
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
        for config, implementation in zip(configs, implementations):
            config._attn_implementation = implementation


# Llama-family and GPT-NeoX attention: q, k, v (rotary applied, grouped-query) reach a pluggable attention
# function; the myopic one replaces it for the duration of the context.
FILLED_CACHE = "myopic(): incremental decoding with a filled KV cache is not supported (the gradient is for training)"
INTERFACE_FAMILIES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "GPTNeoXAttention")
_INTERFACE_NAME = "forethought_myopic"


def myopic_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention layers :func:`myopic` patches (empty for models it cannot make myopic)."""
    return [m for m in model.modules() if (isinstance(m, GPT2Attention) and not m.is_cross_attention)
            or type(m).__name__ in INTERFACE_FAMILIES]


def check_myopic_support(model: nn.Module) -> list[nn.Module]:
    """:func:`myopic_layers`, refusing a model that has none."""
    layers = myopic_layers(model)
    if not layers:
        raise ForethoughtError(f"the myopic gradient is implemented for GPT-2, Llama, Mistral, Qwen2 and GPT-NeoX "
                               f"attention; {type(model).__name__} has none")
    return layers


def has_fast_path(model: nn.Module) -> bool:
    """Whether ``impl="fast"`` applies to every layer :func:`myopic` patches (GPT-2 attention only, so far)."""
    return all(isinstance(layer, GPT2Attention) for layer in check_myopic_support(model))


def is_myopic(model: nn.Module) -> bool:
    """Whether ``model`` is currently inside a :func:`myopic` context."""
    return any(isinstance(m.__dict__.get("forward"), (_MyopicForward, _InterfaceForward)) for m in model.modules())


class _InterfaceForward:
    """Replacement for a Llama-family / GPT-NeoX attention forward. ``cut="residual"``: the layer's own forward
    first runs on a detached copy of its input, and the attention function only records the keys and values
    it is given (k̃, ṽ: rotary and all, the gradient reaching the weights but not the input); then the real
    forward runs, and :func:`_interface_attention` attends to k̃, ṽ off the diagonal and to the live k, v on it.
    ``cut="kv"``: the live keys and values, detached off the diagonal."""

    _CACHES = ("past_key_values", "past_key_value", "layer_past")

    def __init__(self, layer: nn.Module, cut: Cut):
        self.layer, self.cut = layer, cut
        self.recording, self.recorded = False, None

    def __call__(self, *args, **kwargs):
        forward = type(self.layer).forward
        if self.cut == "residual":
            if "hidden_states" in kwargs:
                detached_args, detached_kwargs = args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
            else:
                detached_args, detached_kwargs = (args[0].detach(), *args[1:]), dict(kwargs)
            detached_kwargs = {k: (None if k in self._CACHES else v) for k, v in detached_kwargs.items()}
            self.recording = True
            try:
                forward(self.layer, *detached_args, **detached_kwargs)  # records k̃, ṽ; its output is discarded
            finally:
                self.recording = False
        try:
            return forward(self.layer, *args, **kwargs)
        finally:
            self.recorded = None


def _interface_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """The attention function of a myopic Llama-family / GPT-NeoX layer: query [b, heads, t, d], key and value
    [b, kv_heads, t, d] → (output [b, t, heads, d], None)."""
    state = module.__dict__["forward"]
    if key.shape[-2] != query.shape[-2]:
        raise ForethoughtError(FILLED_CACHE)
    if state.recording:
        state.recorded = (key, value)
        return query.new_zeros(query.transpose(1, 2).shape), None
    key_past, value_past = state.recorded if state.cut == "residual" else (key.detach(), value.detach())
    groups = getattr(module, "num_key_value_groups", 1)
    key, value, key_past, value_past = (x.repeat_interleave(groups, dim=1) for x in (key, value, key_past, value_past))
    out = reference_myopic_attention(query, key, value, key_past, value_past, scaling, attention_mask, dropout)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(_INTERFACE_NAME, _interface_attention)
AttentionMaskInterface.register(_INTERFACE_NAME, sdpa_mask)


class _MyopicForward:
    """Replacement for ``GPT2Attention.forward`` (same signature and return) producing the myopic gradient."""

    def __init__(self, layer: GPT2Attention, cut: Cut, impl: Impl):
        self.layer, self.cut, self.impl = layer, cut, impl

    def __call__(
        self,
        hidden_states: torch.Tensor,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        layer = self.layer
        batch, seq, d_model = hidden_states.shape
        if past_key_values is not None and past_key_values.get_seq_length(layer.layer_idx) > 0:
            raise ForethoughtError(FILLED_CACHE)
        if self.cut == "residual":
            q, k, v, k_past, v_past = _KeyValueDetachedCopy.apply(
                hidden_states, layer.c_attn.weight, layer.c_attn.bias
            )
        else:
            q, k, v = layer.c_attn(hidden_states).split(d_model, dim=2)
            k_past, v_past = k.detach(), v.detach()
        q, k, v, k_past, v_past = (_heads(x, layer.num_heads) for x in (q, k, v, k_past, v_past))
        if past_key_values is not None:  # keep the cache's forward values, as a vanilla pass would
            past_key_values.update(k.detach(), v.detach(), layer.layer_idx)

        dropout = layer.attn_dropout.p if layer.training else 0.0
        fast_applies = attention_mask is None and dropout == 0.0
        if self.impl == "fast" and not fast_applies:
            raise ForethoughtError("myopic(impl='fast') needs no attention mask and no active attention dropout")
        out = fast_myopic_attention(q, k, v, k_past, v_past, layer.scaling) if fast_applies and self.impl != "reference" else None
        if out is None and self.impl == "fast":
            raise ForethoughtError(f"myopic(impl='fast'): no fused attention kernel supports {q.dtype} heads of size "
                                   f"{q.shape[-1]} on {q.device}; use impl='auto' to fall back to the reference path")
        if out is None:
            out = reference_myopic_attention(q, k, v, k_past, v_past, layer.scaling, attention_mask, dropout)
        out = out.transpose(1, 2).reshape(batch, seq, d_model)
        return layer.resid_dropout(layer.c_proj(out)), None


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, seq, d_model] → [batch, heads, seq, d_head]."""
    batch, seq, d_model = x.shape
    return x.view(batch, seq, n_heads, d_model // n_heads).transpose(1, 2)


class _KeyValueDetachedCopy(torch.autograd.Function):
    """``q, k, v = x @ W + b`` (GPT-2's fused ``c_attn``) plus ``k̃, ṽ``: the same values, whose gradient
    reaches W and b but not x. One forward matmul; the backward folds k̃, ṽ's gradient into W's."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        d_model = x.shape[-1]
        qkv = torch.addmm(bias, x.reshape(-1, d_model), weight).view(*x.shape[:-1], -1)  # [b, t, 3d]
        ctx.save_for_backward(x, weight)
        q, k, v = qkv.split(d_model, dim=-1)
        return q, k, v, k.clone(), v.clone()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_q, g_k, g_v, g_k_past, g_v_past):
        x, weight = ctx.saved_tensors
        g_q, g_k, g_v, g_k_past, g_v_past = (
            torch.zeros_like(x) if g is None else g for g in (g_q, g_k, g_v, g_k_past, g_v_past)
        )
        g_live = torch.cat([g_q, g_k, g_v], dim=-1).reshape(-1, weight.shape[1])  # [b·t, 3d]
        g_all = torch.cat([g_q, g_k + g_k_past, g_v + g_v_past], dim=-1).reshape(-1, weight.shape[1])
        x_flat = x.reshape(-1, x.shape[-1])
        g_x = (g_live @ weight.t().to(g_live.dtype)).view_as(x)
        g_weight = (x_flat.t().to(g_all.dtype) @ g_all).to(weight.dtype)
        g_bias = g_all.sum(0).to(weight.dtype)
        return g_x.to(x.dtype), g_weight, g_bias


def reference_myopic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The paper's myopic attention with materialised scores. All tensors [batch, heads, seq, d_head].

    ``attention_mask`` is Hugging Face's 4-D mask (bool: True = attend, or additive float), causal part
    included; ``None`` means plain causal attention.
    """
    seq = q.shape[-2]
    scores = (q @ k_past.transpose(-1, -2)) * scale  # [b, h, t, t]: q_i · k̃_j
    live_diagonal = (q * k).sum(-1, keepdim=True) * scale  # [b, h, t, 1]: q_i · k_i
    eye = torch.eye(seq, dtype=torch.bool, device=q.device)
    scores = torch.where(eye, live_diagonal, scores)
    if attention_mask is None:
        causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:  # the dtype's lowest, not −inf: a padded query row that may attend
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)  # nothing stays finite, as in HF
    else:
        scores = scores + attention_mask
    weights = torch.softmax(scores.to(torch.promote_types(q.dtype, torch.float32)), dim=-1).to(v.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=dropout > 0)
    self_weight = weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # [b, h, t, 1]
    return weights @ v_past + self_weight * (v - v_past)


def fast_myopic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_past: torch.Tensor,
    v_past: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """Flash attention on (q, k̃, ṽ) plus the O(T·d) diagonal correction. Causal, no mask, no dropout.

    All tensors [batch, heads, seq, d_head]; ``k``/``k_past`` (and ``v``/``v_past``) must hold equal values.
    None where no fused kernel supports this device, dtype and head size (the caller falls back).
    """
    fused = flash_attention_with_lse(q, k_past, v_past, scale)  # [b,h,t,d], [b,h,t]
    if fused is None:
        return None
    out, lse = fused
    with torch.no_grad():
        precise = torch.promote_types(q.dtype, torch.float32)  # bf16 scores are summed in fp32
        self_score = (q.to(precise) * k.to(precise)).sum(-1) * scale  # [b, h, t]
        self_weight = torch.exp(self_score - lse.to(precise)).to(q.dtype).unsqueeze(-1)  # a_ii
        value_minus_out = v_past - out
    delta_k = (k - k.detach()) - (k_past - k_past.detach())  # zero; gradient +1 to k, −1 to k̃
    delta_v = (v - v.detach()) - (v_past - v_past.detach())
    score_delta = (q.detach() * delta_k).sum(-1, keepdim=True) * scale  # zero-valued s_ii deviation
    return out + self_weight * score_delta * value_minus_out + self_weight * delta_v


Fused = tuple[torch.Tensor, torch.Tensor]


def _cuda_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Fused:
    """The flash kernel: fp16/bf16, sm80+ for bf16, head sizes the build supports (it raises otherwise)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("flash attention needs fp16 or bf16")
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return out[0], out[1].detach()


def _cuda_efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Fused:
    """Memory-efficient attention: any float dtype; raises for head sizes or GPUs it does not support."""
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=scale)
    return out[0], out[1][..., : q.shape[-2]].detach()


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Fused:
    """The tiled CPU flash kernel."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse.detach()


FUSED_KERNELS: dict[str, tuple] = {"cuda": (_cuda_flash, _cuda_efficient), "cpu": (_cpu_flash,)}  # in order of preference
_UNSUPPORTED: set[tuple] = set()  # (kernel, device, dtype, head size) that raised once: not tried again


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Fused | None:
    """Causal fused attention that also returns the row log-sum-exp λ ([batch, heads, seq], no gradient).

    Tries :data:`FUSED_KERNELS` of the device in order (CUDA: flash, then memory-efficient; CPU: the tiled
    flash kernel); a kernel that refuses the dtype, head size or GPU generation is remembered and skipped.
    None when none applies: the caller uses the reference path.
    """
    for kernel in FUSED_KERNELS.get(q.device.type, ()):
        key = (kernel.__name__, str(q.device), q.dtype, q.shape[-1])
        if key in _UNSUPPORTED:
            continue
        try:
            return kernel(q, k, v, scale)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError):
            _UNSUPPORTED.add(key)
    return None
