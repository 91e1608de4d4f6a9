"""The myopic gradient equals a per-position brute force, exactly (float64)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import pytest
import torch
from torch.nn.functional import cross_entropy
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

from forethought.core.errors import ForethoughtError
from forethought.models.myopic import (
    fast_myopic_attention,
    is_myopic,
    myopic,
    myopic_layers,
    reference_myopic_attention,
)
from tests.conftest import tiny_family


def lm_losses(model, tokens) -> torch.Tensor:
    """Per-position next-token losses [batch, seq-1]."""
    logits = model(tokens, use_cache=False).logits[:, :-1]
    return cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def grads(model, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))


def attention_layers(model):
    return [m for m in model.modules() if isinstance(m, GPT2Attention)]


@contextmanager
def rewrite_attention_inputs(model, cut: str, rewrite):
    """Apply ``rewrite(layer_index, tensor) -> tensor`` to every attention layer's input hidden states
    (cut="residual") or to the output of its fused q|k|v projection (cut="kv")."""
    handles = []
    for index, layer in enumerate(attention_layers(model)):
        if cut == "residual":
            hook = lambda module, args, index=index: (rewrite(index, args[0]), *args[1:])  # noqa: E731
            handles.append(layer.register_forward_pre_hook(hook))
        else:
            hook = lambda module, args, out, index=index: rewrite(index, out)  # noqa: E731
            handles.append(layer.c_attn.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def gpt2_frozen_inputs(model, cut: str, rewrite):
    """GPT-2: ``rewrite`` every attention input (cut="residual") or the key and value thirds of the fused q|k|v
    projection (cut="kv": every query stays live)."""
    if cut == "residual":
        return rewrite_attention_inputs(model, cut, rewrite)

    def keys_and_values(index, x):
        d_model = x.shape[-1] // 3
        return torch.cat([x[..., :d_model], rewrite(index, x[..., d_model:])], dim=-1)
    return rewrite_attention_inputs(model, cut, keys_and_values)


def brute_force_myopic_grads(
    model, losses_fn, inputs, cut: str, frozen_inputs=gpt2_frozen_inputs
) -> list[torch.Tensor]:
    """Σ_i ∂ℓ_i/∂θ with every position j ≠ i frozen: its attention input (cut="residual") or its keys and values
    (cut="kv") replaced by constants recorded from a plain forward pass. ``frozen_inputs(model, cut, rewrite)``
    applies ``rewrite(index, tensor [batch, seq, …])`` to what is frozen."""
    recorded: dict[int, torch.Tensor] = {}

    def record(index, x):
        recorded[index] = x.detach()
        return x

    with torch.no_grad(), frozen_inputs(model, cut, record):
        n_positions = losses_fn(model, inputs).shape[1]
    total = None
    for position in range(n_positions):
        def freeze(index, x, position=position):
            live = torch.zeros(x.shape[1], dtype=torch.bool)
            live[position] = True
            return torch.where(live.view(1, -1, *[1] * (x.dim() - 2)), x, recorded[index])

        with frozen_inputs(model, cut, freeze):
            position_grads = grads(model, losses_fn(model, inputs)[:, position].sum())
        total = position_grads if total is None else [a + b for a, b in zip(total, position_grads)]
    return total


def regression_losses(model, inputs) -> torch.Tensor:
    return model(inputs).squeeze(-1).square()  # [batch, seq]


@pytest.mark.parametrize("cut", ["residual", "kv"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_lm_myopic_gradient_equals_brute_force(tiny_lm, tokens, cut, impl):
    expected = brute_force_myopic_grads(tiny_lm, lm_losses, tokens, cut)
    with myopic(tiny_lm, cut=cut, impl=impl):
        actual = grads(tiny_lm, lm_losses(tiny_lm, tokens).sum())
    vanilla = grads(tiny_lm, lm_losses(tiny_lm, tokens).sum())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=0)
    assert max((a - e).abs().max().item() for a, e in zip(vanilla, expected)) > 1e-4


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_regression_myopic_gradient_equals_brute_force(tiny_regression, impl):
    inputs = torch.randn(2, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = brute_force_myopic_grads(tiny_regression, regression_losses, inputs, "residual")
    with myopic(tiny_regression, impl=impl):
        actual = grads(tiny_regression, regression_losses(tiny_regression, inputs).sum())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=0)


def test_forward_values_identical(tiny_lm, tokens):
    vanilla = tiny_lm(tokens).logits
    with myopic(tiny_lm):
        fast = tiny_lm(tokens).logits
    with myopic(tiny_lm, impl="reference"):
        reference = tiny_lm(tokens).logits
    assert torch.equal(fast, vanilla)
    torch.testing.assert_close(reference, vanilla, atol=1e-12, rtol=0)


def test_fast_and_reference_kernels_agree_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    k_past, v_past = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    weights = torch.randn(2, 3, 9, 4, dtype=torch.float64, generator=gen)
    results = []
    for kernel in (fast_myopic_attention, reference_myopic_attention):
        out = kernel(q, k, v, k_past, v_past, 0.5)
        results.append((out, torch.autograd.grad((out * weights).sum(), (q, k, v, k_past, v_past))))
    (fast_out, fast_grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(fast_out, ref_out, atol=1e-12, rtol=0)
    for f, r in zip(fast_grads, ref_grads):
        torch.testing.assert_close(f, r, atol=1e-12, rtol=0)


def test_context_restores_vanilla_even_after_an_exception(tiny_lm, tokens):
    before = grads(tiny_lm, lm_losses(tiny_lm, tokens).sum())
    with pytest.raises(RuntimeError, match="boom"):
        with myopic(tiny_lm):
            assert is_myopic(tiny_lm)
            raise RuntimeError("boom")
    assert not is_myopic(tiny_lm)
    after = grads(tiny_lm, lm_losses(tiny_lm, tokens).sum())
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_bad_arguments_are_named(tiny_lm):
    with pytest.raises(ForethoughtError, match="unknown myopic cut 'diagonal'"):
        with myopic(tiny_lm, cut="diagonal"):
            pass
    with pytest.raises(ForethoughtError, match="already inside a myopic context"):
        with myopic(tiny_lm):
            with myopic(tiny_lm):
                pass
    assert not is_myopic(tiny_lm)
    with pytest.raises(ForethoughtError, match="implemented for GPT-2, Llama, Mistral, Qwen2 and GPT-NeoX attention; "
                                               "Linear has none"):
        with myopic(torch.nn.Linear(2, 2)):
            pass


def masked_lm_losses(mask):
    """Per-position next-token losses [batch, seq − 1] of a padded batch, 0 where the input or the target is
    padding (a padded query row attends to nothing: what it predicts is not a model's prediction)."""
    def losses(model, tokens):
        logits = model(tokens, attention_mask=mask, use_cache=False).logits[:, :-1]
        return cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none") * mask[:, :-1] * mask[:, 1:]
    return losses


def padding_mask(tokens: torch.Tensor, padding: str) -> torch.Tensor:
    """A [batch, seq] mask padding two of the three sequences on the ``padding`` side (0 = padding; "none": all 1)."""
    mask = torch.ones_like(tokens)
    if padding == "left":
        mask[0, :3], mask[1, :1] = 0, 0
    elif padding == "right":
        mask[0, -3:], mask[2, -2:] = 0, 0
    return mask


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("cut", ["residual", "kv"])
def test_padded_batches_give_the_exact_myopic_gradient_and_no_nan(tiny_lm, tokens, padding, cut):
    mask = padding_mask(tokens, padding)
    losses = masked_lm_losses(mask)
    expected = brute_force_myopic_grads(tiny_lm, losses, tokens, cut)
    with myopic(tiny_lm, cut=cut):  # a mask: the reference path
        actual = grads(tiny_lm, losses(tiny_lm, tokens).sum())
        logits = tiny_lm(tokens, attention_mask=mask).logits
    assert all(torch.isfinite(a).all() for a in actual) and torch.isfinite(logits).all()
    vanilla = tiny_lm(tokens, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], vanilla[real], atol=1e-12, rtol=0)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=0)


def _refuses(q, k, v, scale):
    raise RuntimeError("this kernel does not support the inputs")


@pytest.mark.parametrize("kernels", ["first refuses", "all refuse"])
def test_fused_kernels_fall_back_in_order_then_to_the_reference(tiny_lm, tokens, monkeypatch, kernels):
    import forethought.models.myopic as module

    tried = []

    def spy(kernel):
        def wrapped(*args):
            tried.append(kernel.__name__)
            return kernel(*args)
        wrapped.__name__ = kernel.__name__
        return wrapped

    cpu_flash = module.FUSED_KERNELS["cpu"][0]
    chain = (_refuses, cpu_flash) if kernels == "first refuses" else (_refuses,)
    monkeypatch.setattr(module, "FUSED_KERNELS", {"cpu": tuple(spy(k) for k in chain)})
    monkeypatch.setattr(module, "_UNSUPPORTED", set())
    expected = brute_force_myopic_grads(tiny_lm, lm_losses, tokens, "residual")
    with myopic(tiny_lm):
        actual = grads(tiny_lm, lm_losses(tiny_lm, tokens).sum())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=0)
    n_layers = len(attention_layers(tiny_lm))
    if kernels == "first refuses":  # refused once (then remembered), the next kernel serves every layer
        assert tried == ["_refuses"] + ["_cpu_flash"] * n_layers
    else:
        assert tried == ["_refuses"]
        with pytest.raises(ForethoughtError, match=r"no fused attention kernel supports torch.float64 heads of size 4"):
            with myopic(tiny_lm, impl="fast"):
                tiny_lm(tokens)


@contextmanager
def freeze_family_inputs(model, cut: str, rewrite):
    """Llama / NeoX: ``rewrite(index, tensor)`` applied to every attention layer's input (cut="residual") or to its
    key and value projections (cut="kv": Llama's k_proj, v_proj; NeoX's k and v parts of the fused projection)."""
    attentions = myopic_layers(model)
    handles = []
    for index, layer in enumerate(attentions):
        if cut == "residual":
            def hook(module, args, kwargs, index=index):
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": rewrite(index, kwargs["hidden_states"])}
                return (rewrite(index, args[0]), *args[1:]), kwargs
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        elif hasattr(layer, "k_proj"):
            for offset, projection in enumerate((layer.k_proj, layer.v_proj)):
                handles.append(projection.register_forward_hook(
                    lambda module, args, out, key=2 * index + offset: rewrite(key, out)))
        else:
            def fused(module, args, out, index=index, head=layer.head_size):
                per_head = out.view(*out.shape[:-1], -1, 3 * head)  # [b, t, heads, q | k | v]
                kept = torch.cat([per_head[..., :head], rewrite(index, per_head[..., head:])], dim=-1)
                return kept.view_as(out)
            handles.append(layer.query_key_value.register_forward_hook(fused))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("cut", ["residual", "kv"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "neox"])
def test_llama_qwen2_and_neox_myopic_gradients_equal_brute_force(family, cut, impl, tokens):
    model = tiny_family(family)
    expected = brute_force_myopic_grads(model, lm_losses, tokens, cut, freeze_family_inputs)
    vanilla_logits = model(tokens).logits
    vanilla = grads(model, lm_losses(model, tokens).sum())
    with myopic(model, cut=cut, impl=impl):
        assert is_myopic(model)
        logits = model(tokens).logits
        actual = grads(model, lm_losses(model, tokens).sum())
    assert not is_myopic(model) and model.config._attn_implementation != "forethought_myopic"
    if impl == "fast":  # forward values unchanged: bit for bit on the fused path
        assert torch.equal(logits, vanilla_logits)
    torch.testing.assert_close(logits, vanilla_logits, atol=1e-12, rtol=0)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=0)
    assert max((a - e).abs().max().item() for a, e in zip(vanilla, expected)) > 1e-4  # the cut changes something


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_bfloat16_autocast_forward_is_bit_identical_on_the_fast_path(family, tiny_lm, tokens):
    model = (tiny_lm if family == "gpt2" else tiny_family(family)).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vanilla = model(tokens).logits
        with myopic(model, impl="fast"):
            logits = model(tokens).logits
    assert logits.dtype == vanilla.dtype and torch.equal(logits, vanilla)


@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("family", ["llama", "mistral", "neox"])
def test_padded_and_sliding_window_batches_give_the_exact_myopic_gradient(family, padding, tokens):
    """Also Mistral's sliding window (4 positions): a mask even without padding, so the reference path."""
    model = tiny_family(family)
    mask = padding_mask(tokens, padding)
    losses = masked_lm_losses(mask)
    expected = brute_force_myopic_grads(model, losses, tokens, "residual", freeze_family_inputs)
    with myopic(model):
        actual = grads(model, losses(model, tokens).sum())
        logits = model(tokens, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], model(tokens, attention_mask=mask).logits[real], atol=1e-12, rtol=0)
    for a, e in zip(actual, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, atol=1e-9, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "neox"])
def test_kv_cache_holds_vanilla_values_and_a_filled_cache_is_refused(family, tiny_lm, tokens):
    model = tiny_lm if family == "gpt2" else tiny_family(family)
    vanilla = _returned_cache(model(tokens, use_cache=True))
    with myopic(model):
        out = model(tokens, use_cache=True)
        for layer in range(model.config.num_hidden_layers):
            for mine, theirs in zip(_layer_cache(_returned_cache(out), layer), _layer_cache(vanilla, layer)):
                assert mine.shape == theirs.shape  # the live heads only, not [live | copy]
                torch.testing.assert_close(mine, theirs, atol=1e-12, rtol=0)
        with pytest.raises(ForethoughtError, match="filled KV cache is not supported"):
            model(tokens[:, -1:], use_cache=True, **{_cache_argument(model): _returned_cache(out)})


def _cache_argument(model) -> str:
    """The name the installed transformers gives the KV cache argument: ``cache`` from 5.25, ``past_key_values``
    before."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _returned_cache(out):
    """The KV cache a forward returned, under the installed transformers' name for it."""
    return out.cache if "cache" in out else out.past_key_values


def _layer_cache(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) a Hugging Face cache holds for ``layer``."""
    return cache.layers[layer].keys, cache.layers[layer].values


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_gradient_checkpointing_keeps_the_myopic_gradient(family, tiny_lm, tokens):
    model = (tiny_lm if family == "gpt2" else tiny_family(family)).train()  # checkpointing acts in training mode
    calls = []
    attention = next(m for m in model.modules() if m.__class__.__name__.endswith("Attention"))
    attention.register_forward_pre_hook(lambda module, args: calls.append(1))
    with myopic(model):
        plain = grads(model, lm_losses(model, tokens).sum())
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointed = grads(model, lm_losses(model, tokens).sum())
    model.gradient_checkpointing_disable()
    assert len(calls) == 3  # once without checkpointing; twice with (forward, then recomputed in the backward)
    for a, e in zip(checkpointed, plain):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0)
