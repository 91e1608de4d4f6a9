"""Edits of the residual stream h[l, t] at chosen (layer, positions): the workbench's one place that writes into
a model while it runs.

Five edits, each a small frozen dataclass acting on h [batch, seq, d_model] at ``positions`` (an int, a list of
ints, a slice, or None for every position) of residual layer ``layer`` (0 … L, or its TransformerLens hook name,
``blocks.{l}.hook_resid_pre`` / ``blocks.{l-1}.hook_resid_post``):

- :class:`ProjectOut` removes a subspace (h ← h − h·Q·Qᵀ, Q an orthonormal basis of the given directions);
- :class:`AddVector` adds a vector (steering);
- :class:`MeanAblate` replaces h by a mean (or only its component in a subspace: h ← h − P(h − mean));
- :class:`Erase` applies an affine concept erasure (LEACE at a chosen rank, :mod:`probes.erasure`);
- :class:`Patch` writes in the residuals of another run over the same positions (record them with
  :func:`probes.residuals.model_residuals`).

Two routes, the same edits:

- :func:`intervene` — a context manager over a Hugging Face model of any family :mod:`models.families` knows:
  forward hooks at the points where :func:`probes.residuals.capture_residuals` reads h[l] (block 0's input for
  l = 0, block l − 1's output for l ≥ 1), placed before any other hook there, so a capture inside the context
  sees the edited stream. This is the fast route: the model's own forward, nothing re-implemented.
- :meth:`Edit.hook` — a ``(hook name, function)`` pair for TransformerLens: ``bridge.run_with_hooks(tokens,
  fwd_hooks=[edit.hook() for edit in edits])`` or ``with bridge.hooks(fwd_hooks=...)``.

Every edit changes only its layer and positions: layers below are untouched, and — the model being causal — so is
every earlier position anywhere (tested).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from forethought.core.errors import ForethoughtError
from forethought.models.families import decoder_blocks
from forethought.probes.residuals import hook_name

Positions = int | Sequence[int] | slice | None  # None: every position
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def residual_layer(layer: int | str) -> int:
    """Residual layer l from l itself or from its TransformerLens hook name (``blocks.3.hook_resid_pre`` → 3,
    ``blocks.3.hook_resid_post`` → 4)."""
    if isinstance(layer, int):
        return layer
    match = _HOOK.fullmatch(layer)
    if match is None:
        raise ForethoughtError(f"cannot edit {layer!r}: name a residual layer l or a hook blocks.N.hook_resid_pre/post")
    return int(match[1]) + (match[2] == "post")


@dataclass(frozen=True)
class Edit:
    """An edit of h[layer] at ``positions``; subclasses say what it writes there (:meth:`edited`)."""

    layer: int | str
    positions: Positions = None

    def __post_init__(self):
        residual_layer(self.layer)  # a bad hook name is refused when the edit is made
        for name in self.REQUIRED:
            if getattr(self, name) is None:
                raise ForethoughtError(f"{type(self).__name__} needs {name}")
            object.__setattr__(self, name, torch.as_tensor(getattr(self, name)))

    REQUIRED: ClassVar[tuple[str, ...]] = ()  # the tensors an edit of this kind must be given

    @property
    def residual_layer(self) -> int:
        return residual_layer(self.layer)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h [batch, seq, d_model] → the same with the edited positions rewritten (a new tensor; gradients flow)."""
        index = _position_index(self.positions, h.shape[1])
        out = h.clone()
        out[:, index] = self.edited(h[:, index], index).to(h.dtype)
        return out

    def edited(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """h at the edited positions [batch, n, d_model] (``index``: those positions) → their new values."""
        raise NotImplementedError

    def hook(self) -> tuple[str, Callable[..., torch.Tensor]]:
        """This edit as a TransformerLens forward hook on a bridge: ``(hook name, function(tensor, hook))``."""
        return hook_name(self.residual_layer), lambda h, hook: self(h)


@dataclass(frozen=True)
class ProjectOut(Edit):
    """Remove the span of ``directions`` [k, d_model] (any basis; orthonormalised here) from h."""

    directions: torch.Tensor | None = None
    REQUIRED: ClassVar[tuple[str, ...]] = ("directions",)

    def edited(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        basis = orthonormal_basis(self.directions, h)  # [d, k]
        return h - (h @ basis) @ basis.T


@dataclass(frozen=True)
class AddVector(Edit):
    """Add ``vector`` [d_model] to h (the same at every edited position)."""

    vector: torch.Tensor | None = None
    REQUIRED: ClassVar[tuple[str, ...]] = ("vector",)

    def edited(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return h + self.vector.to(h)


@dataclass(frozen=True)
class MeanAblate(Edit):
    """Replace h by ``mean`` [d_model]; with ``directions`` [k, d_model], only h's component in their span
    (h ← h − P(h − mean), P the projection onto the span)."""

    mean: torch.Tensor | None = None
    directions: torch.Tensor | None = None
    REQUIRED: ClassVar[tuple[str, ...]] = ("mean",)

    def edited(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        mean = self.mean.to(h)
        if self.directions is None:
            return mean.expand_as(h)
        basis = orthonormal_basis(self.directions, h)
        return h - ((h - mean) @ basis) @ basis.T


@dataclass(frozen=True)
class Erase(Edit):
    """An affine erasure h ← h − ((h − mean) · rightᵀ) · leftᵀ (``left`` [d, r], ``right`` [r, d]): concept erasure
    of rank r (:class:`probes.erasure.ConceptEraser` makes these), computed in float64."""

    mean: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    REQUIRED: ClassVar[tuple[str, ...]] = ("mean", "left", "right")

    def edited(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        wide = h.to(torch.float64)
        return wide - (wide - self.mean.to(wide)) @ self.right.to(wide).T @ self.left.to(wide).T


@dataclass(frozen=True)
class Patch(Edit):
    """Write in ``source`` [batch, seq, d_model]: h[l] of another run on inputs of the same shape (only the edited
    positions are read)."""

    source: torch.Tensor | None = None
    REQUIRED: ClassVar[tuple[str, ...]] = ("source",)

    def edited(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        source = self.source
        if source.shape[0] != h.shape[0] or source.shape[-1] != h.shape[-1]:
            raise ForethoughtError(f"cannot patch residuals of shape {tuple(source.shape)} into a run of batch "
                                   f"{h.shape[0]} and d_model {h.shape[-1]}")
        return source[:, index.to(source.device)].to(h)


def orthonormal_basis(directions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [d_model, k] of the span of ``directions`` [k, d_model] (QR, in float64), in ``like``'s
    dtype and device; refuses directions of the wrong width or a zero one."""
    directions = torch.as_tensor(directions).reshape(-1, directions.shape[-1])
    if directions.shape[-1] != like.shape[-1]:
        raise ForethoughtError(f"directions of width {directions.shape[-1]} cannot edit a residual stream of width "
                               f"{like.shape[-1]}")
    q, r = torch.linalg.qr(directions.to(torch.float64).T)  # [d, k]
    if (r.diagonal().abs() < 1e-12 * directions.norm()).any():
        raise ForethoughtError("the directions are linearly dependent (or one is zero); give a basis")
    return q.to(like)


@contextmanager
def intervene(model: PreTrainedModel, *edits: Edit) -> Iterator[dict[int, torch.Tensor]]:
    """Within the context, every forward pass of ``model`` runs with ``edits`` applied to its residual stream.
    Yields {layer: the edited h[layer] [batch, seq, d_model]} of the latest pass, for inspection.

    Several edits of one layer apply in the order given."""
    blocks = decoder_blocks(model)
    by_layer: dict[int, list[Edit]] = {}
    for edit in edits:
        layer = edit.residual_layer
        if not 0 <= layer <= len(blocks):
            raise ForethoughtError(f"cannot edit layer {layer}: this model has residual layers 0 … {len(blocks)}")
        by_layer.setdefault(layer, []).append(edit)
    edited: dict[int, torch.Tensor] = {}

    def apply(layer: int, h: torch.Tensor) -> torch.Tensor:
        for edit in by_layer[layer]:
            h = edit(h)
        edited[layer] = h
        return h

    handles = []
    for layer in by_layer:
        if layer == 0:
            handles.append(blocks[0].register_forward_pre_hook(_input_hook(apply), with_kwargs=True, prepend=True))
        else:
            handles.append(blocks[layer - 1].register_forward_hook(_output_hook(apply, layer), prepend=True))
    try:
        yield edited
    finally:
        for handle in handles:
            handle.remove()


def _input_hook(apply: Callable[[int, torch.Tensor], torch.Tensor]):
    """A forward pre-hook editing block 0's hidden-state input (h[0]), positional or keyword."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (apply(0, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": apply(0, kwargs["hidden_states"])}

    return hook


def _output_hook(apply: Callable[[int, torch.Tensor], torch.Tensor], layer: int):
    """A forward hook editing a block's output h[layer] (a tensor, or the first entry of a tuple)."""

    def hook(module: nn.Module, args: tuple, output):
        if isinstance(output, tuple):
            return (apply(layer, output[0]), *output[1:])
        return apply(layer, output)

    return hook


def _position_index(positions: Positions, seq: int) -> torch.Tensor:
    """The edited positions as an index tensor, refusing any outside 0 … seq − 1."""
    if positions is None:
        return torch.arange(seq)
    if isinstance(positions, slice):
        return torch.arange(seq)[positions]
    index = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), dtype=torch.long)
    if index.numel() and not (-seq <= int(index.min()) and int(index.max()) < seq):
        raise ForethoughtError(f"positions {index.tolist()} out of range for sequences of {seq} tokens")
    return index % seq
