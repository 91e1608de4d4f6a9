"""Multi-token prediction (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token
Prediction"): the positive control of the pre-caching experiments — a model *trained* to prepare for later tokens.

The model's first L − 1 decoder blocks are the shared trunk; head 1 is its own last block, final norm and
unembedding (the ordinary next-token model, which every analysis reads); heads 2 … K are further copies of the
last block, each reading the trunk's output h[L − 1] and unembedded through the same final norm and unembedding
(shared, as the paper shares its unembedding). Head k at position t predicts x[t + k]; the training loss is the
mean of the K heads' cross-entropies (each over the positions that have a target k ahead):

    loss = (1/K) Σ_k CE(head_k(h[L−1, t]), x[t + k])      t = 0 … T − 1 − k

The extra heads live on the model as ``model.mtp_heads`` while it trains (so the optimiser, gradient clipping,
data parallelism and devices see them), but a checkpoint stores them *beside* the model, in ``mtp_heads.safetensors``:
``model.safetensors`` is an ordinary causal LM that loads anywhere, and a resume reads both. Each extra head starts
as a copy of the last block (freshly initialised when training from scratch, the pretrained block when
fine-tuning). ``mtp:1`` is next-token training, bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from forethought.core.errors import ForethoughtError, one_line
from forethought.models.families import decoder_blocks, unembedding
from forethought.models.tasks.text import TextTask, next_token_loss

NEXT_TOKEN = "next-token"  # the ordinary objective; "mtp:K" adds K − 1 heads
HEADS_FILE = "mtp_heads.safetensors"
_OBJECTIVE = re.compile(r"^mtp:(\d+)$")


def objective_heads(objective: str) -> int:
    """The number of heads K an objective trains: ``next-token`` → 1, ``mtp:K`` → K (1 ≤ K ≤ 16)."""
    if objective == NEXT_TOKEN:
        return 1
    match = _OBJECTIVE.match(objective)
    if match is None or not 1 <= int(match.group(1)) <= 16:
        raise ForethoughtError(f"objective must be {NEXT_TOKEN} or mtp:K with K in 1 … 16, got {objective!r}")
    return int(match.group(1))


def add_heads(model: PreTrainedModel, heads: int) -> None:
    """Give ``model`` its K − 1 extra heads (``model.mtp_heads``), each a copy of its last decoder block."""
    if heads > 1:
        last = decoder_blocks(model)[-1]
        model.mtp_heads = nn.ModuleList(copy.deepcopy(last) for _ in range(heads - 1))


def extra_heads(model: nn.Module) -> nn.ModuleList | None:
    """The extra heads of a model being trained with multi-token prediction; None for next-token training."""
    return getattr(model, "mtp_heads", None)


def multi_token_loss(model: PreTrainedModel, runnable: nn.Module, inputs: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """The mean of the K heads' cross-entropies (nats per token) on ``inputs`` [batch, T] (``targets`` = inputs);
    ``runnable`` is ``model`` itself or its data-parallel / compiled wrapper. With no extra heads: the next-token
    loss, computed exactly as :func:`~models.tasks.text.next_token_loss` of the model's logits."""
    losses = head_losses(model, runnable, inputs, targets)
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def head_losses(model: PreTrainedModel, runnable: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                reduction: str = "mean") -> list[torch.Tensor]:
    """Each head's cross-entropy, [head 1 on x[t+1], head 2 on x[t+2], …]: scalars (nats per token), or with
    ``reduction="none"`` head k's [batch, T − k]."""
    heads = extra_heads(model)
    if heads is None:
        return [next_token_loss(runnable(inputs, use_cache=False).logits, targets, reduction)]
    with trunk_output(model) as trunk:
        logits = runnable(inputs, use_cache=False).logits
    return [next_token_loss(logits, targets, reduction)] + [
        next_token_loss(head_logits(model, head, trunk), targets, reduction, head) for head in range(2, len(heads) + 2)]


def head_logits(model: PreTrainedModel, head: int, trunk: dict[str, Any], cache: Cache | None = None) -> torch.Tensor:
    """Head ``head``'s (≥ 2) logits [batch, seq, vocab] from the last block's captured call (:func:`trunk_output`).
    With ``cache`` the head attends through its own key/value cache — its keys and values of earlier positions,
    not the last block's —, put in place of the trunk's in the call (a continuation after a cached prefix)."""
    args, kwargs = trunk["args"], trunk["kwargs"]
    if cache is not None:
        args = tuple(cache if isinstance(value, Cache) else value for value in args)
        kwargs = {name: cache if isinstance(value, Cache) else value for name, value in kwargs.items()}
    hidden = extra_heads(model)[head - 2](*args, **kwargs)
    norm, unembed = unembedding(model)
    return unembed(norm(hidden[0] if isinstance(hidden, tuple) else hidden))


class MultiTokenTask(TextTask):
    """:class:`~models.tasks.text.TextTask`'s sequences and stream, trained with ``model``'s heads
    (:func:`multi_token_loss`; the held-out loss a run records stays the next-token loss, a plain TextTask's)."""

    def __init__(self, sequences: np.ndarray, model: PreTrainedModel, seed: int = 0):
        super().__init__(sequences, seed)
        self.model = model

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return multi_token_loss(self.model, model, inputs, targets)


@contextlib.contextmanager
def trunk_output(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Capture the positional and keyword arguments ``model``'s last block is called with (h[L − 1] and the masks,
    positions, rotary tables and cache of its family): the extra heads are called with exactly the same."""
    captured: dict[str, Any] = {}

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.update(args=args, kwargs=kwargs)

    handle = decoder_blocks(model)[-1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def without_heads(model: nn.Module) -> Iterator[nn.ModuleList | None]:
    """``model`` with its extra heads taken off for the duration (to save or load it as an ordinary causal LM);
    yields them (None if it has none)."""
    heads = model._modules.pop("mtp_heads", None)
    try:
        yield heads
    finally:
        if heads is not None:
            model.mtp_heads = heads


def save_heads(heads: nn.ModuleList, folder: Path) -> None:
    """Write the extra heads' weights beside a checkpoint's model (``mtp_heads.safetensors``)."""
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in heads.state_dict().items()},
              folder / HEADS_FILE, metadata={"heads": str(len(heads) + 1)})


def load_heads(heads: nn.ModuleList, folder: Path) -> None:
    """Read the extra heads' weights saved beside a checkpoint (refusing a missing, damaged or other-shaped file)."""
    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        raise ForethoughtError(f"checkpoint {folder} has no {HEADS_FILE}: it was not trained with {len(heads) + 1} "
                               "heads")
    try:
        heads.load_state_dict(load_file(path))
    except (SafetensorError, RuntimeError, OSError) as error:
        raise ForethoughtError(f"cannot read {path} ({one_line(error, 200)}): damaged, or saved with another "
                               "number of heads") from None
