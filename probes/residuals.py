"""Residual streams h[l, t], l = 0 … L — the only file that imports TransformerLens.

Layer convention (DESIGN.md): l = 0 is the input to block 0 (``blocks.0.hook_resid_pre``); l ≥ 1 is the
output of block l − 1 (``blocks.{l-1}.hook_resid_post``), so l = L is the last block's output *before* the
final LayerNorm. (Hugging Face's last ``hidden_states`` entry has the final LayerNorm applied: not used.)

Two routes give the same tensors (up to the attention kernel's rounding): :func:`read_layers` /
:func:`model_residuals` through forward hooks on a Hugging Face model's decoder blocks (any family
:mod:`models.families` knows, the regression model included) — the model's own forward pass, stopped at the
deepest layer asked for: what caching, streaming and the experiments use — and :func:`bridge_residuals` through
TransformerLens's ``TransformerBridge`` (token models of any family TransformerLens supports, with every hook it
offers, for interactive use and for edits inside attention; ~0.5× the speed of the model's own forward pass).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle
from transformer_lens.model_bridge import TransformerBridge
from transformers import PreTrainedModel

from forethought.core.errors import ForethoughtError
from forethought.models.families import decoder_blocks
from forethought.models.lm import LMCheckpoint


def hook_name(layer: int) -> str:
    """TransformerLens hook of residual layer ``layer`` (0 … L)."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def load_bridge(source: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """Boot a TransformerBridge from a ``save_pretrained`` folder (with tokenizer files) or a hub id.

    Raw Hugging Face weights (no TransformerLens weight processing): cached residuals are the model's own.
    """
    try:
        return TransformerBridge.boot_transformers(str(source), device=device, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise ForethoughtError(f"cannot boot a TransformerBridge from {source}: {error}") from error


def bridge_over_copy(checkpoint: LMCheckpoint, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> TransformerBridge:
    """A TransformerBridge over a copy of ``checkpoint``'s model, read from nowhere: the bridge rewraps the modules it
    is handed, so the caller's model stays as it was (raw weights, no weight processing; the copy in eval mode)."""
    return TransformerBridge.boot_transformers(checkpoint.source, hf_model=copy.deepcopy(checkpoint.model).eval(),
                                               tokenizer=checkpoint.tokenizer, device=device, dtype=dtype)


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    layers = list(range(n_layers + 1)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    if bad:
        raise ForethoughtError(f"layers {bad} out of range: this model has residual layers 0 … {n_layers}")
    return layers


class StreamingResiduals:
    """Residuals computed on demand by the model's forward passes (no disk cache): the probes' data source
    for corpora too large to cache; every read of a block of sequences runs the model on them (:func:`read_layers`)."""

    def __init__(self, model: PreTrainedModel, tokens: np.ndarray, device: str = "cpu"):
        self.model, self.tokens, self.device = model, np.asarray(tokens), device
        self.d_model = model.config.hidden_size

    def read(self, sequences: np.ndarray, layers: Sequence[int]) -> np.ndarray:
        """[len(layers), len(sequences), seq, d_model] float32."""
        chunk = torch.from_numpy(self.tokens[sequences]).to(self.device)
        captured = read_layers(self.model, chunk, _check_layers(layers, len(decoder_blocks(self.model))))
        return torch.stack([captured[layer] for layer in layers]).float().cpu().numpy()


@torch.no_grad()
def bridge_residuals(
    bridge: TransformerBridge, tokens: torch.Tensor, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """tokens [batch, seq] → residuals [len(layers), batch, seq, d_model] via ``run_with_cache``.

    Only the asked-for hooks are cached, and blocks past the deepest asked-for layer are not run (nor the final
    norm and unembedding: the residual stream is all that is read).
    """
    layers = _check_layers(layers, bridge.cfg.n_layers)
    names = [hook_name(layer) for layer in layers]
    # stopping at block k keeps blocks 0 … k − 1; h[0] is block 0's input, so block 0 always runs
    _, cache = bridge.run_with_cache(tokens, names_filter=names, stop_at_layer=max(*layers, 1))
    return torch.stack([cache[name] for name in names])


def _layer_hooks(model: PreTrainedModel, keep: Callable[[int, torch.Tensor], None],
                 deepest: int) -> list[RemovableHandle]:
    """Forward hooks on the decoder blocks that hand ``keep(layer, h[layer])`` every residual layer 0 … ``deepest``
    of a pass (layer 0: block 0's input; layer l: block l − 1's output)."""
    blocks = decoder_blocks(model)
    handles = [blocks[0].register_forward_pre_hook(lambda _, args: keep(0, args[0]))]
    for index, block in enumerate(blocks[:deepest]):
        handles.append(block.register_forward_hook(lambda _, __, out, layer=index + 1: keep(layer, out)))
    return handles


@contextmanager
def capture_residuals(model: PreTrainedModel, retain_grad: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Within the context, each forward pass of ``model`` fills the yielded {layer: h[layer]} with
    [batch, seq, d_model] tensors of every residual layer 0 … L (forward hooks on the decoder blocks).

    ``retain_grad``: keep each tensor's ``.grad`` after a backward pass (the gradient reaching h[l]).
    """
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        if retain_grad and hidden.requires_grad:
            hidden.retain_grad()
        captured[layer] = hidden

    handles = _layer_hooks(model, keep, len(decoder_blocks(model)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class _Enough(Exception):
    """Raised by a forward hook once the deepest residual layer asked for is in hand: later blocks, the final norm
    and the unembedding are never run."""


@torch.no_grad()
def read_layers(model: PreTrainedModel, inputs: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """{layer: h[layer] [batch, seq, d_model]} of one forward pass of ``model`` (token ids [batch, seq] or features
    [batch, seq, in_dim]), read by forward hooks on its decoder blocks, in eval mode; the pass stops at the deepest
    layer asked for, and builds no KV cache. The caching route: as fast as the model's own forward pass
    (docs/probes.md)."""
    wanted, deepest = set(layers), max(layers)
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int, hidden: torch.Tensor) -> None:
        if layer in wanted:
            captured[layer] = hidden
        if layer == deepest:
            raise _Enough

    handles = _layer_hooks(model, keep, deepest)
    options = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    training = model.training
    model.eval()  # no dropout in what is read; the caller's mode is restored
    try:
        model(inputs, **options)
    except _Enough:
        pass
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return captured


def model_residuals(
    model: PreTrainedModel, inputs: torch.Tensor, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """inputs (token ids [batch, seq] or features [batch, seq, in_dim]) → [len(layers), batch, seq, d_model],
    through :func:`read_layers`."""
    layers = _check_layers(layers, len(decoder_blocks(model)))
    captured = read_layers(model, inputs, layers)
    return torch.stack([captured[layer] for layer in layers])
