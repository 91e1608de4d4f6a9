"""Own path and future path: alone they split an edit's effect at t and after t exactly, together they are the
plainly edited run, and a zero edit leaves every logit as it was — in every family the workbench supports."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.models.families import decoder_blocks
from forethought.models.heldout import token_losses
from forethought.models.mtp import add_heads
from forethought.probes.interventions import AddVector, ProjectOut, intervene
from forethought.probes.paths import path_effects, path_logits
from tests.conftest import tiny_family


@pytest.fixture(params=["gpt2", "llama", "neox", "mistral"])
def model(request, tiny_lm):
    return tiny_lm if request.param == "gpt2" else tiny_family(request.param)


@pytest.mark.parametrize("layer", [0, 1, "last"])
def test_the_two_paths_split_the_plain_edited_run_at_t(model, layer):
    last = model.config.num_hidden_layers
    layer = last if layer == "last" else layer
    tokens = torch.randint(0, 23, (3, 10), generator=torch.Generator().manual_seed(0))
    edit = AddVector(layer, positions=5, vector=torch.linspace(-2, 2, model.config.hidden_size))
    with torch.no_grad():
        clean = model(tokens).logits
        with intervene(model, edit):
            edited = model(tokens).logits
    own, future, both = (path_logits(model, tokens, edit, path) for path in ("own", "future", "both"))
    exact = dict(rtol=0, atol=1e-12)  # float64 models
    torch.testing.assert_close(both, edited, **exact)
    torch.testing.assert_close(own[:, :6], edited[:, :6], **exact)  # the own path: the edit's effect up to t …
    torch.testing.assert_close(own[:, 6:], clean[:, 6:], **exact)  # … and none after
    torch.testing.assert_close(future[:, :6], clean[:, :6], **exact)  # the future path: nothing up to t …
    torch.testing.assert_close(future[:, 6:], edited[:, 6:], **exact)  # … all of the edit's effect after it
    assert (edited[:, 5] - clean[:, 5]).abs().max() > 1e-3
    after = (edited[:, 6:] - clean[:, 6:]).abs().max()  # h[L, t] feeds no keys or values: no future path
    assert after == 0 if layer == last else after > 1e-3
    zero = AddVector(layer, positions=5, vector=torch.zeros(model.config.hidden_size))
    for path in ("own", "future", "both"):
        torch.testing.assert_close(path_logits(model, tokens, zero, path), clean, **exact)


@pytest.mark.parametrize("layer", [1, "last"])
def test_the_cached_prefix_gives_the_whole_prefix_runs_effects(model, layer):
    """A causal LM's effects from the cached prefix 0 … t − 1 and the replayed blocks under the edit (the default)
    equal those of whole-prefix runs, and an edit that changes nothing gives exactly 0. The blocks under the edit
    never run in an edited run: with every clean part cached, only the blocks above it do."""
    layer = model.config.num_hidden_layers if layer == "last" else layer
    tokens = torch.randint(0, 23, (5, 11), generator=torch.Generator().manual_seed(2))
    vector = torch.linspace(-1, 1, model.config.hidden_size)
    edit_at = partial(lambda i, layer: AddVector(layer, positions=i, vector=vector), layer=layer)
    clean = {}
    cached = path_effects(model, tokens, edit_at, positions=[0, 3, 7], max_offset=2, batch_size=2, clean=clean)
    whole = path_effects(model, tokens, edit_at, positions=[0, 3, 7], max_offset=2, batch_size=2,
                         losses=token_losses, lag=1)
    np.testing.assert_allclose(cached, whole, rtol=0, atol=1e-10)
    assert np.abs(cached).max() > 1e-3
    ran = []  # the blocks whose first part runs, when only edited runs are left to do
    handles = [next(block.children()).register_forward_pre_hook(partial(lambda *_, index: ran.append(index), index=i))
               for i, block in enumerate(decoder_blocks(model))]
    try:
        again = path_effects(model, tokens, edit_at, positions=[0, 3, 7], max_offset=2, batch_size=2, clean=clean)
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_array_equal(again, cached)
    assert set(ran) == set(range(layer, model.config.num_hidden_layers))
    zero = path_effects(model, tokens, lambda i: AddVector(1, positions=i, vector=vector * 0), [0, 3, 7], 2)
    assert (zero == 0).all()
    with pytest.raises(ForethoughtError, match=r"positions 0 … 8 with offsets up to 2 need sequences of 12 positions"):
        path_effects(model, tokens, edit_at, positions=[0, 8], max_offset=2)


def test_replayed_blocks_get_their_own_forward_back(tiny_lm):
    """A forward set on a block instance (as accelerate's hooks do) is what the block has again after a replayed run;
    a block without one is left without one."""
    blocks = decoder_blocks(tiny_lm)
    own = lambda *args, **kwargs: type(blocks[0]).forward(blocks[0], *args, **kwargs)  # noqa: E731
    blocks[0].forward = own
    try:
        tokens = torch.randint(0, 23, (2, 8), generator=torch.Generator().manual_seed(1))
        vector = torch.ones(tiny_lm.config.hidden_size)
        path_effects(tiny_lm, tokens, lambda i: AddVector(len(blocks), positions=i, vector=vector), [2], max_offset=1)
        assert blocks[0].__dict__["forward"] is own and all("forward" not in block.__dict__ for block in blocks[1:])
    finally:
        del blocks[0].forward


def test_a_multi_token_heads_effects_from_cached_prefixes_equal_whole_prefix_runs(model):
    """Head 2 attends through its own key/value cache (its keys of earlier positions, not the last block's): its
    effects from cached prefixes equal those of whole-prefix runs, in every family; an edit of h[L], which the head
    does not read, changes its loss nowhere."""
    model = copy.deepcopy(model)
    add_heads(model, 3)
    with torch.no_grad():  # heads unlike the last block, so that reading the wrong keys would show
        for parameter in model.mtp_heads.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3),
                                             dtype=parameter.dtype))
    tokens = torch.randint(0, 23, (5, 12), generator=torch.Generator().manual_seed(2))
    vector = torch.linspace(-1, 1, model.config.hidden_size)
    for layer in (1, model.config.num_hidden_layers):
        edit_at = partial(lambda i, layer: AddVector(layer, positions=i, vector=vector), layer=layer)
        cached = path_effects(model, tokens, edit_at, positions=[0, 3, 7], max_offset=2, batch_size=2, head=2)
        whole = path_effects(model, tokens, edit_at, positions=[0, 3, 7], max_offset=2, batch_size=2,
                             losses=partial(token_losses, head=2), lag=2)
        np.testing.assert_allclose(cached, whole, rtol=0, atol=1e-10)
        if layer == 1:
            assert np.abs(cached).max() > 1e-3
        else:
            assert (cached == 0).all()
    with pytest.raises(ForethoughtError, match=r"positions 0 … 8 with offsets up to 2 need sequences of 13 positions"):
        path_effects(model, tokens, edit_at, positions=[0, 8], max_offset=2, head=2)


def test_a_path_run_edits_one_position(tiny_lm):
    tokens = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ForethoughtError, match=r"a path run edits one position t; this edit is at positions \[1, 2\]"):
        path_logits(tiny_lm, tokens, AddVector(1, positions=[1, 2], vector=torch.ones(16)), "own")
    with pytest.raises(ForethoughtError, match="unknown path 'sideways'; choose one of own, future, both"):
        path_logits(tiny_lm, tokens, AddVector(1, positions=2, vector=torch.ones(16)), "sideways")


# ---- a planted mechanism: one feature only a later position reads, one only its own position reads

V, T = 8, 12  # tokens, positions
A, B, P, C = slice(0, 8), slice(8, 16), slice(16, 28), slice(28, 36)  # residual blocks of a 40-wide stream


def centred(index: int, width: int) -> torch.Tensor:
    """One-hot minus its mean: every block of the stream sums to 0, so LayerNorm's centring changes nothing."""
    return torch.eye(width, dtype=torch.float64)[index] - 1 / width


def planted_model():
    """A hand-built one-layer GPT-2 (attention only, LayerNorms made linear by a huge ε). The embedding writes
    token x into blocks A and B and position p into P. Attention makes position s attend to s − 2 (from P) and
    copies its A block into C. The unembedding reads C (the token two back) and B (its own token, mapped to x + 1
    mod V). So A at t is read only by position t + 2; B at t only by t itself."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=V, n_positions=T, n_embd=40, n_layer=1, n_head=1, layer_norm_epsilon=1e8,
                        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.transformer.h[0].ln_1, model.transformer.ln_f):
            norm.weight.fill_(1e4)  # LN(h) = (h − mean) · 1e4 / sqrt(var + 1e8) ≈ h for centred h
        for x in range(V):
            model.transformer.wte.weight[x, A] = centred(x, V)
            model.transformer.wte.weight[x, B] = centred(x, V)
        for p in range(T):
            model.transformer.wpe.weight[p, P] = centred(p, T)
        weights = model.transformer.h[0].attn.c_attn.weight  # [d, 3d]: queries, keys, values
        for p in range(T):
            weights[P.start + p, p] = 300.0  # query of position p: p (scores are scaled by 1/√40)
            if p + 2 < T:
                weights[P.start + p, 40 + p + 2] = 1.0  # key of position p: p + 2, met by the query two later
        for x in range(V):
            weights[A.start + x, 80 + x] = 1.0  # value: the A block
        model.transformer.h[0].attn.c_proj.weight[:V, C] = torch.eye(V, dtype=torch.float64)  # into C
        for y in range(V):
            model.lm_head.weight[y, C] = 3 * centred(y, V)  # the token two back …
            model.lm_head.weight[y, B] = 3 * centred((y - 1) % V, V)  # … and its own token + 1
    return model


def sampled(model, n: int, seed: int) -> torch.Tensor:
    """Sequences drawn from the model itself: its predictions are the truth, so a change costs loss (the KL)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (n, 2), generator=generator)
    with torch.no_grad():
        while tokens.shape[1] < T:
            probabilities = model(tokens).logits[:, -1].softmax(-1)
            tokens = torch.cat([tokens, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
    return tokens


@pytest.mark.parametrize("feature, path", [("A", "future"), ("B", "own")])
def test_a_planted_feature_comes_out_on_its_own_path_only(feature, path):
    model = planted_model()
    tokens = sampled(model, 256, seed=0)
    block = A if feature == "A" else B
    directions = torch.eye(40, dtype=torch.float64)[block]
    effects = path_effects(model, tokens, lambda t: ProjectOut(0, positions=t, directions=directions),
                           positions=range(2, T - 4), max_offset=2).mean(axis=(0, 1))  # [offset 0, 1, 2]
    if path == "future":  # only position t + 2 reads A at t: its loss (offset 2) rises; t's and t + 1's do not
        assert abs(effects[0]) < 1e-6 and abs(effects[1]) < 1e-6 and effects[2] > 0.1
    else:  # B at t is read by t's own prediction only
        assert effects[0] > 0.1 and np.abs(effects[1:]).max() < 1e-6
