"""The myopic gradient: no loss at position i sends gradient into another position's hidden state.

Under ``with myopic(model):`` every GPT-2, Llama-family or GPT-NeoX self-attention layer attends, for every pair
i ≠ j, to keys and values computed from a *detached* copy of position j's attention input (``cut="residual"``, the
paper's definition), or to detached keys and values (``cut="kv"``, stricter: the key/value projections then learn
only from the diagonal). Forward values are unchanged; only the gradient changes. Equivalently, the
gradient is the sum over i of ∂ℓ_i/∂θ with every other position's attention input held constant.

Two implementations:

- ``reference``: the paper's. Materialise the T×T scores of q against the detached keys, overwrite the
  diagonal with the live q_i·k_i, softmax, and add ``diag(A)·(v − ṽ)``. O(T²) memory.
- ``fast`` (the default when it applies: no mask, no attention dropout, and a fused kernel that supports the
  device, dtype and head size — else ``auto`` falls back to ``reference``): flash attention on (q, k̃, ṽ),
  which also returns the row log-sum-exp λ, plus an O(T·d) diagonal correction that is zero in value and
  routes the diagonal's gradient to the live k_i, v_i (DESIGN.md, "Making myopic training as fast as vanilla"):

      o_i += a_ii · ⟨sg q_i, δk_i⟩ · sg(ṽ_i − o_i) + a_ii · δv_i,    a_ii = exp(⟨q_i, k_i⟩·scale − λ_i)

  with δk_i = (k_i − sg k_i) − (k̃_i − sg k̃_i), likewise δv_i: the gradient +1 to k_i and −1 to k̃_i cancels
  what flash already sends into k̃_i on the diagonal (DESIGN.md's ⟨sg q_i, k_i⟩ alone would count the
  diagonal's key-weight gradient twice). :class:`_DiagonalCorrection` applies exactly that gradient in the
  backward and is the identity in the forward, so the output stays bit-identical to vanilla's.

k̃, ṽ never need a second projection: :class:`_DetachedInputCopy` returns the live projection from one matmul
plus a copy whose gradient reaches the projection weights but not the input. GPT-2's attention is rewritten here;
Llama-family and GPT-NeoX layers keep their own forward (rotary, grouped-query): their key and value projections
emit [live | copy] as twice the heads, rotary treats both alike, and the attention function they call splits them.
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

from forethought.core.errors import ForethoughtError
from forethought.models.families import FAMILIES

Cut = Literal["residual", "kv"]
Impl = Literal["auto", "fast", "reference"]
CUTS: tuple[str, ...] = ("residual", "kv")
IMPLS: tuple[str, ...] = ("auto", "fast", "reference")


@contextmanager
def myopic(model: nn.Module, cut: Cut = "residual", impl: Impl = "auto") -> Iterator[nn.Module]:
    """Within this context, forward passes of ``model`` produce the myopic gradient.

    Args:
        model: any module holding GPT-2, Llama, Mistral, Qwen2 or GPT-NeoX self-attention layers.
        cut: ``"residual"`` (the paper's) or ``"kv"`` (also cut the key/value projections of other positions).
        impl: ``"fast"`` (flash attention + diagonal correction), ``"reference"`` (materialised scores), or
            ``"auto"``: fast unless an attention mask, active attention dropout, or a device / dtype / head size
            no fused kernel supports requires the reference.
    """
    check_cut(cut)
    if impl not in IMPLS:
        raise ForethoughtError(f"unknown myopic impl {impl!r}; choose one of {', '.join(IMPLS)}")
    layers = check_myopic_support(model)
    if any("forward" in layer.__dict__ for layer in layers):
        raise ForethoughtError("myopic(): the model is already inside a myopic context (or patched)")
    interfaced = [layer for layer in layers if not isinstance(layer, GPT2Attention)]
    configs = list({id(layer.config): layer.config for layer in interfaced}.values())
    implementations = [config._attn_implementation for config in configs]
    for layer in layers:
        layer.forward = (_MyopicForward if isinstance(layer, GPT2Attention) else _InterfaceForward)(layer, cut, impl)
    for config in configs:  # their attention function becomes the myopic one (their masks: sdpa's, None when causal)
        config._attn_implementation = _INTERFACE_NAME
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
        for config, implementation in zip(configs, implementations):
            config._attn_implementation = implementation


def check_cut(cut: str) -> str:
    """``cut`` if it names a myopic cut, else a one-line error naming the choices."""
    if cut not in CUTS:
        raise ForethoughtError(f"unknown myopic cut {cut!r}; choose one of {', '.join(CUTS)}")
    return cut


FILLED_CACHE = "myopic(): incremental decoding with a filled KV cache is not supported (the gradient is for training)"
# What transformers calls the KV cache an attention layer is handed: ``cache`` from 5.25, ``past_key_values``
# before (still accepted, deprecated), ``past_key_value`` / ``layer_past`` in older or NeoX layers. A replaced
# forward is not wrapped by transformers' renaming decorator, so it must know every name.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
# Llama-family and GPT-NeoX attention: q, k, v (rotary applied, grouped-query) reach a pluggable attention
# function; the myopic one replaces it for the duration of the context. Their key/value projections by class
# (models.families, the one table; GPT-2's attention is rewritten here instead):
KEY_VALUE_PROJECTIONS = {f.attention: f.key_value for f in FAMILIES.values() if f.attention != "GPT2Attention"}
_INTERFACE_NAME = "forethought_myopic"


def myopic_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention layers :func:`myopic` patches (empty for models it cannot make myopic)."""
    return [m for m in model.modules() if (isinstance(m, GPT2Attention) and not m.is_cross_attention)
            or type(m).__name__ in KEY_VALUE_PROJECTIONS]


def check_myopic_support(model: nn.Module) -> list[nn.Module]:
    """:func:`myopic_layers`, refusing a model that has none."""
    layers = myopic_layers(model)
    if not layers:
        raise ForethoughtError(f"the myopic gradient is implemented for GPT-2, Llama, Mistral, Qwen2 and GPT-NeoX "
                               f"attention; {type(model).__name__} has none")
    return layers


def is_myopic(model: nn.Module) -> bool:
    """Whether ``model`` is currently inside a :func:`myopic` context."""
    return any(isinstance(m.__dict__.get("forward"), (_MyopicForward, _InterfaceForward)) for m in model.modules())


def _layer_cache(kwargs: dict, layer_index: int):
    """The KV cache among an attention layer's keyword arguments, under whichever name it came (or None),
    refusing a filled one: myopic decoding from a cache is not supported."""
    cache = next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    if cache is not None and cache.get_seq_length(layer_index) > 0:
        raise ForethoughtError(FILLED_CACHE)
    return cache


class _InterfaceForward:
    """Replacement for a Llama-family / GPT-NeoX attention forward: the class's own forward, where (``cut=
    "residual"``) the key/value projections return [live | detached-input copy] (twice the heads, rotary applied
    to both by the layer) and the cache is handed only the live half; :func:`_interface_attention` splits them."""

    def __init__(self, layer: nn.Module, cut: Cut, impl: Impl):
        self.layer, self.cut, self.impl = layer, cut, impl

    def __call__(self, *args, **kwargs):
        layer = self.layer
        _layer_cache(kwargs, layer.layer_idx)
        if self.cut == "kv":
            return type(layer).forward(layer, *args, **kwargs)
        kwargs = {k: (_LiveHalfCache(v) if k in CACHE_ARGUMENTS and v is not None else v) for k, v in kwargs.items()}
        projections = [getattr(layer, name) for name in KEY_VALUE_PROJECTIONS[type(layer).__name__]]
        for projection in projections:
            projection.forward = _LinearWithDetachedCopy(projection)
        try:
            return type(layer).forward(layer, *args, **kwargs)
        finally:
            for projection in projections:
                del projection.forward


class _LinearWithDetachedCopy:
    """Forward of an ``nn.Linear`` returning [y | y], y = x·Wᵀ + b [..., out]: the second copy's gradient reaches W
    and b but not x (k̃, ṽ of the detached input, from one matmul)."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(_DetachedInputCopy.apply(x, self.linear.weight, self.linear.bias, 0, True), dim=-1)


class _LiveHalfCache:
    """A Hugging Face cache seen through a [live | copy] layer: it stores the live half, detached (a vanilla
    pass's values); an empty cache (the only kind :func:`myopic` accepts) returns what it is given."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_index: int, *args, **kwargs):
        heads = key.shape[1] // 2
        self.cache.update(key[:, :heads].detach(), value[:, :heads].detach(), layer_index, *args, **kwargs)
        return key, value


def _interface_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """The attention function of a myopic Llama-family / GPT-NeoX layer: query [b, heads, t, d] (NeoX's: twice
    the heads, the copy's unused), key and value [b, 2·kv_heads, t, d] ([live | copy]; cut="kv": kv_heads, live)
    → (output [b, t, heads, d], None)."""
    state = module.__dict__["forward"]
    if state.cut == "residual":
        query = query[:, : module.config.num_attention_heads]
        (key, key_past), (value, value_past) = key.chunk(2, dim=1), value.chunk(2, dim=1)
    else:
        key_past, value_past = key.detach(), value.detach()
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` heads
    if groups > 1:
        key, value, key_past, value_past = (x.repeat_interleave(groups, 1) for x in (key, value, key_past, value_past))
    out = myopic_attention(query, key, value, key_past, value_past, scaling, state.impl, attention_mask, dropout)
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
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        layer = self.layer
        batch, seq, d_model = hidden_states.shape
        cache = _layer_cache(kwargs, layer.layer_idx)
        if self.cut == "residual":  # [q | k | v] and a copy of [k | v] (k̃, ṽ)
            projected, copy = _DetachedInputCopy.apply(hidden_states, layer.c_attn.weight, layer.c_attn.bias, d_model,
                                                       False)
            (q, k, v), (k_past, v_past) = projected.split(d_model, dim=2), copy.split(d_model, dim=2)
        else:
            q, k, v = layer.c_attn(hidden_states).split(d_model, dim=2)
            k_past, v_past = k.detach(), v.detach()
        q, k, v, k_past, v_past = (_heads(x, layer.num_heads) for x in (q, k, v, k_past, v_past))
        if cache is not None:  # keep the cache's forward values, as a vanilla pass would
            cache.update(k.detach(), v.detach(), layer.layer_idx)
        dropout = layer.attn_dropout.p if layer.training else 0.0
        out = myopic_attention(q, k, v, k_past, v_past, layer.scaling, self.impl, attention_mask, dropout)
        out = out.transpose(1, 2).reshape(batch, seq, d_model)
        return layer.resid_dropout(layer.c_proj(out)), None


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, seq, d_model] → [batch, heads, seq, d_head]."""
    batch, seq, d_model = x.shape
    return x.view(batch, seq, n_heads, d_model // n_heads).transpose(1, 2)


class _DetachedInputCopy(torch.autograd.Function):
    """``y = x·W + b`` [..., out] from one matmul, and ``y[..., start:]`` again as a second output (a view: no copy)
    whose gradient reaches W and b but not x. ``weight`` is [in, out] (GPT-2's Conv1D) or, with ``linear``,
    [out, in] (``nn.Linear``; bias may be None)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, start: int, linear: bool):
        if linear:
            projected = nn.functional.linear(x, weight, bias)
        else:
            projected = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        ctx.save_for_backward(x, weight)
        ctx.start, ctx.linear, ctx.has_bias = start, linear, bias is not None
        return projected, projected[..., start:]

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_live: torch.Tensor, grad_copy: torch.Tensor):  # unused outputs: zeros (materialised)
        x, weight = ctx.saved_tensors
        weight_dtype, width = weight.dtype, weight.shape[0] if ctx.linear else weight.shape[1]
        grad_live = grad_live.reshape(-1, width)  # [b·t, out]
        grad_all = grad_live.clone()
        grad_all[:, ctx.start:] += grad_copy.reshape(-1, width - ctx.start)  # the copy's: weights and bias only
        x_flat, weight = x.reshape(-1, x.shape[-1]).to(grad_all.dtype), weight.to(grad_all.dtype)
        if ctx.linear:
            grad_x, grad_weight = grad_live @ weight, grad_all.t() @ x_flat
        else:
            grad_x, grad_weight = grad_live @ weight.t(), x_flat.t() @ grad_all
        grad_bias = grad_all.sum(0).to(weight_dtype) if ctx.has_bias else None
        return grad_x.view_as(x).to(x.dtype), grad_weight.to(weight_dtype), grad_bias, None, None


def myopic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_past: torch.Tensor, v_past: torch.Tensor,
                     scale: float, impl: Impl = "auto", attention_mask: torch.Tensor | None = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Myopic attention by ``impl``: the fast path where it applies (no mask, no dropout, a fused kernel for the
    device, dtype and head size), else the reference; ``impl="fast"`` refuses in one line what it cannot do.
    All tensors [batch, heads, seq, d_head]; k̃ = ``k_past``, ṽ = ``v_past`` hold the values of k, v."""
    fast_applies = attention_mask is None and dropout == 0.0
    if impl == "fast" and not fast_applies:
        raise ForethoughtError("myopic(impl='fast') needs no attention mask and no active attention dropout")
    out = fast_myopic_attention(q, k, v, k_past, v_past, scale) if fast_applies and impl != "reference" else None
    if out is None and impl == "fast":
        raise ForethoughtError(f"myopic(impl='fast'): no fused attention kernel supports {q.dtype} heads of size "
                               f"{q.shape[-1]} on {q.device}; use impl='auto' to fall back to the reference path")
    if out is None:
        out = reference_myopic_attention(q, k, v, k_past, v_past, scale, attention_mask, dropout)
    return out


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
    if torch.is_autocast_enabled(q.device.type):  # as sdpa would: the kernel runs in the autocast dtype
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v, k_past, v_past = (x.to(dtype) for x in (q, k, v, k_past, v_past))
    fused = flash_attention_with_lse(q, k_past, v_past, scale)  # [b,h,t,d], [b,h,t]
    if fused is None:
        return None
    out, lse = fused
    with torch.no_grad():
        precise = torch.promote_types(q.dtype, torch.float32)  # bf16 scores are summed in fp32
        self_score = (q.to(precise) * k.to(precise)).sum(-1) * scale  # [b, h, t]
        self_weight = torch.exp(self_score - lse.to(precise)).to(q.dtype)  # a_ii
    return _DiagonalCorrection.apply(out, q.detach(), k, v, k_past, v_past, self_weight, scale)


class _DiagonalCorrection(torch.autograd.Function):
    """The identity on flash's output o [b, h, t, d]; in the backward it moves the diagonal's gradient, which flash
    sent to k̃_i, ṽ_i, to the live k_i, v_i. For g = ∂L/∂o_i and a_ii = ``self_weight`` [b, h, t]:

        ∂L/∂k_i += c_i·q_i,  ∂L/∂k̃_i −= c_i·q_i,   c_i = a_ii · scale · ⟨g, ṽ_i − o_i⟩
        ∂L/∂v_i += a_ii·g,   ∂L/∂ṽ_i −= a_ii·g

    the gradient of DESIGN.md's zero-valued terms a_ii·(s_ii − sg s_ii)·sg(ṽ_i − o_i) + a_ii·(v_i − ṽ_i), in a
    few O(T·d) operations of the backward only (autograd through those terms costs ~15 in each direction)."""

    @staticmethod
    def forward(ctx, out, q, k, v, k_past, v_past, self_weight, scale: float):
        ctx.save_for_backward(q, v_past, out, self_weight)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, v_past, out, self_weight = ctx.saved_tensors
        coefficient = self_weight * ctx.scale * torch.linalg.vecdot(v_past - out, grad)  # c_i [b, h, t]
        grad_k = coefficient.unsqueeze(-1) * q
        grad_v = self_weight.unsqueeze(-1) * grad
        return grad, None, grad_k, grad_v, -grad_k, -grad_v, None, None


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


FUSED_KERNELS: dict[str, tuple] = {
    "cuda": (_cuda_flash, _cuda_efficient),
    "cpu": (_cpu_flash,),
}  # in order of preference
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
