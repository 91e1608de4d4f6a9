"""Edits of the residual stream: exact properties on tiny GPT-2, Llama and GPT-NeoX models (float64)."""

from __future__ import annotations

import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.probes.interventions import AddVector, MeanAblate, Patch, ProjectOut, intervene, residual_layer
from forethought.probes.residuals import capture_residuals, load_bridge, model_residuals
from tests.conftest import tiny_family

FAMILIES = ["gpt2", "llama", "neox"]


@pytest.fixture(params=FAMILIES)
def model(request, tiny_lm):
    return tiny_lm if request.param == "gpt2" else tiny_family(request.param)


def logits(model, tokens) -> torch.Tensor:
    return model(tokens, use_cache=False).logits


def test_the_zero_edit_leaves_the_logits_equal(model, tokens):
    d_model = model.config.hidden_size
    with intervene(model, AddVector(1, vector=torch.zeros(d_model)), AddVector(0, 2, vector=torch.zeros(d_model))):
        edited = logits(model, tokens)
    assert torch.equal(edited, logits(model, tokens))


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_projecting_out_leaves_no_component_there_and_nothing_before_it_changed(model, tokens, layer):
    d_model, position = model.config.hidden_size, 4
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    before = model_residuals(model, tokens)  # [L + 1, batch, seq, d]
    with intervene(model, ProjectOut(layer, position, directions=direction)), capture_residuals(model) as after:
        model(tokens, use_cache=False)
    unit = direction / direction.norm()
    assert (after[layer][:, position] @ unit).abs().max() <= 1e-6  # no component left along it
    assert (before[layer][:, position] @ unit).abs().max() > 1e-3  # … where there was one
    others = [t for t in range(tokens.shape[1]) if t != position]
    assert torch.equal(after[layer][:, others], before[layer][:, others])  # other positions of that layer
    for below in range(layer):
        assert torch.equal(after[below], before[below])  # layers below it
    if layer + 1 < len(before):
        assert not torch.equal(after[layer + 1][:, position], before[layer + 1][:, position])  # it reached on


def test_patching_a_run_into_itself_is_the_identity(model, tokens):
    recorded = model_residuals(model, tokens, [2])[0]
    with intervene(model, Patch(2, None, source=recorded)):
        patched = logits(model, tokens)
    assert torch.equal(patched, logits(model, tokens))


def test_patching_from_another_input_carries_its_positions_over(model, tokens):
    other = torch.roll(tokens, 1, dims=0)  # other sequences, same shape
    recorded = model_residuals(model, other)
    with intervene(model, Patch(1, [2, 3], source=recorded[1])), capture_residuals(model) as after:
        model(tokens, use_cache=False)
    assert torch.equal(after[1][:, [2, 3]], recorded[1][:, [2, 3]])
    assert torch.equal(after[1][:, :2], model_residuals(model, tokens, [1])[0][:, :2])


@pytest.mark.parametrize("position", [0, 3, 6])
def test_an_edit_at_position_t_leaves_every_earlier_position_unchanged(model, tokens, position):
    d_model = model.config.hidden_size
    clean = logits(model, tokens)
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(4))  # not uniform: LayerNorm centres
    edits = [AddVector(1, position, vector=3 * vector),
             MeanAblate(0, position, mean=vector),
             ProjectOut(2, position, directions=torch.eye(d_model)[:3])]
    for edit in edits:
        with intervene(model, edit):
            edited = logits(model, tokens)
        assert torch.equal(edited[:, :position], clean[:, :position]), edit  # causality
        assert not torch.allclose(edited[:, position:], clean[:, position:]), edit  # and it did something


def test_mean_ablation_within_a_subspace_keeps_the_rest(model, tokens):
    d_model = model.config.hidden_size
    mean = torch.randn(d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    basis = torch.eye(d_model, dtype=torch.float64)[:2]
    with intervene(model, MeanAblate(1, None, mean=mean, directions=basis)), capture_residuals(model) as after:
        model(tokens, use_cache=False)
    before = model_residuals(model, tokens, [1])[0]
    torch.testing.assert_close(after[1][..., :2], mean[:2].expand_as(after[1][..., :2]), atol=1e-12, rtol=0)
    torch.testing.assert_close(after[1][..., 2:], before[..., 2:], atol=1e-12, rtol=0)


def test_the_context_yields_the_edited_stream_and_removes_its_hooks(model, tokens):
    d_model = model.config.hidden_size
    with intervene(model, AddVector("blocks.1.hook_resid_pre", vector=torch.ones(d_model))) as edited:
        model(tokens, use_cache=False)
    torch.testing.assert_close(edited[1], model_residuals(model, tokens, [1])[0] + 1, atol=1e-12, rtol=0)
    assert torch.equal(logits(model, tokens), logits(model, tokens))  # hooks gone


def test_a_transformerlens_bridge_runs_the_same_edit(lm_folder, tokens):
    """The edit as a TransformerLens hook on a bridge equals the edit through forward hooks on the HF model."""
    bridge = load_bridge(lm_folder)
    model = bridge.original_model
    edit = ProjectOut("blocks.1.hook_resid_post", 5, directions=torch.randn(2, model.config.hidden_size))
    with intervene(model, edit):
        expected = model(tokens, use_cache=False).logits
    got = bridge.run_with_hooks(tokens, fwd_hooks=[edit.hook()])
    assert edit.hook()[0] == "blocks.1.hook_resid_post" and residual_layer(edit.layer) == 2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, bridge(tokens), atol=1e-3)


def test_bad_edits_are_refused_in_one_line(tiny_lm, tokens):
    with pytest.raises(ForethoughtError, match="AddVector needs vector"):
        AddVector(1)
    with pytest.raises(ForethoughtError, match="cannot edit 'blocks.1.attn'"):
        ProjectOut("blocks.1.attn", directions=torch.ones(16))
    with pytest.raises(ForethoughtError, match="residual layers 0 … 3"):
        with intervene(tiny_lm, AddVector(4, vector=torch.ones(16))):
            pass
    with pytest.raises(ForethoughtError, match="out of range for sequences of 7"):
        with intervene(tiny_lm, AddVector(1, 7, vector=torch.ones(16))):
            tiny_lm(tokens, use_cache=False)
    with pytest.raises(ForethoughtError, match="width 8 cannot edit a residual stream of width 16"):
        with intervene(tiny_lm, ProjectOut(1, directions=torch.ones(8))):
            tiny_lm(tokens, use_cache=False)
    with pytest.raises(ForethoughtError, match="linearly dependent"):
        with intervene(tiny_lm, ProjectOut(1, directions=torch.ones(2, 16))):
            tiny_lm(tokens, use_cache=False)
