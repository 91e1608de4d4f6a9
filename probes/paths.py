"""Own path and future path: how an edit of h[l, t] reaches the model's predictions.

An edit at one position t changes the model's outputs by exactly two routes:

- the **own path** — the edited h[l, t] feeds position t's own later layers, and so the prediction made *at* t;
- the **future path** — every later position s > t reads position t only through its keys and values at the
  blocks l … L − 1, so the predictions at t + 1, t + 2, … change only through those.

:func:`path_logits` runs either path alone, the model being causal: the prefix 0 … t once clean and once
edited, then positions t + 1 … with a key/value cache in which position t's entries are the clean ones (own
path) or the edited ones (future path). Because nothing else connects t to later positions, the own path
changes the logits at t only and the future path those after t only, and together they are the plainly edited
run (all tested to float precision): the change in loss *at* t is the own-path effect and the change *at*
t + k the future-path effect, both read from one edited forward pass. The causal tests (:mod:`analyses.intervene`)
do exactly that; this module is how the reading is checked, and how a user routes an edit by one path.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from forethought.core.errors import ForethoughtError
from forethought.models.families import decoder_blocks
from forethought.models.mtp import head_logits, trunk_output
from forethought.models.tasks.text import next_token_loss
from forethought.probes.interventions import Edit, intervene

Path = Literal["own", "future", "both"]
PATHS: tuple[str, ...] = ("own", "future", "both")


@torch.no_grad()
def path_logits(model: PreTrainedModel, tokens: torch.Tensor, edit: Edit, path: Path) -> torch.Tensor:
    """Logits [batch, seq, vocab] of ``model`` on ``tokens`` [batch, seq] with ``edit`` (at one position t)
    reaching the outputs by ``path`` only: "own" (t's own later layers), "future" (later positions through t's
    keys and values) or "both" (the plain edited run)."""
    if path not in PATHS:
        raise ForethoughtError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")
    if not isinstance(edit.positions, int):
        raise ForethoughtError(f"a path run edits one position t; this edit is at positions {edit.positions!r}")
    t = edit.positions % tokens.shape[1]
    prefix, rest = tokens[:, : t + 1], tokens[:, t + 1:]
    clean = _run(model, prefix)
    with intervene(model, edit):
        edited = _run(model, prefix)
    head = edited if path in ("own", "both") else clean
    if rest.shape[1] == 0:
        return head.logits
    cache = _cache(edited if path == "both" else clean)  # the continuation appends to it
    if path == "future":  # position t's keys and values from the edited run, at every layer: the prefix ends at
        for layer, edited_layer in zip(cache.layers, _cache(edited).layers):  # t, so t is every cache's last entry
            layer.keys[:, :, -1] = edited_layer.keys[:, :, -1]  # (a sliding window's too)
            layer.values[:, :, -1] = edited_layer.values[:, :, -1]
    tail = _run(model, rest, cache)
    return torch.cat([head.logits, tail.logits], dim=1)


def _run(model: PreTrainedModel, tokens: torch.Tensor, cache=None):
    """One forward pass that keeps its key/value cache (continuing ``cache`` if given)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(tokens, use_cache=True, **({name: cache} if cache is not None else {}))


def _cache(output):
    """The key/value cache of a forward pass (``cache`` since transformers 5.2x, ``past_key_values`` before)."""
    return getattr(output, "cache", None) or output.past_key_values


def edited_positions(seq_len: int, n: int, max_offset: int, lag: int = 1) -> list[int]:
    """``n`` positions t evenly spaced from 0 to the last one whose losses at t … t + ``max_offset`` all exist in
    sequences of ``seq_len`` (the loss at s reading ``lag`` positions ahead: 1 for the next token, k for a head k,
    0 for a regression), as :func:`path_effects` takes them; fewer if there are fewer such positions."""
    last = seq_len - max_offset - 1 - lag
    return sorted(set(np.linspace(0, last, min(n, last + 1)).round().astype(int).tolist()))


@torch.no_grad()
def path_effects(model: PreTrainedModel, inputs: torch.Tensor, edit_at: Callable[[int], Edit],
                 positions: Sequence[int], max_offset: int, batch_size: int = 32, clean: dict | None = None,
                 losses: Callable[[PreTrainedModel, torch.Tensor, int], np.ndarray] | None = None,
                 lag: int = 1, head: int = 1) -> np.ndarray:
    """The change in loss at t + k when h[l, t] is edited, for every sequence of ``inputs`` [n, T, ...], t in
    ``positions`` and k = 0 … ``max_offset``: [n, len(positions), max_offset + 1]. Offset 0 is the own path's
    effect, offsets ≥ 1 the future path's (module docstring). ``edit_at(i)`` makes the edit at index i of the
    forward pass it is applied to (the pass holding position t at i).

    Default (``losses`` None): a causal LM's next-token cross-entropy (position s predicts token s + 1), or with
    ``head`` k > 1 that of a multi-token model's head k (s predicts s + k; the model carries its heads). Nothing
    before t changes, so the prefix 0 … t − 1 runs once per (batch, t) into a key/value cache (and the head's own),
    and each edited run — and its unedited twin, the same arithmetic, so that an edit that changes nothing gives
    exactly 0 — runs only positions t … t + max_offset + k on it: ~T / (max_offset + 2) times less work than
    whole prefixes. Nor does anything below the edited layer l change: the edited run replays the blocks under l
    from their clean output (:func:`_replayed`), so it costs the blocks above l only.
    Otherwise ``losses(model, inputs, batch_size)`` gives the per-position loss [n, T − lag] of inputs cut to
    any length (a regression's loss at s: lag 0), and each edited run is a whole prefix 0 … t + max_offset + lag.
    ``clean`` keeps what is shared between calls (prefix caches, unedited losses): pass the same dict to later
    calls on the same model and inputs."""
    lag = head if losses is None else lag
    seq = inputs.shape[1]
    if positions and (min(positions) < 0 or max(positions) + max_offset + 1 + lag > seq):
        raise ForethoughtError(f"positions {min(positions)} … {max(positions)} with offsets up to {max_offset} "
                               f"need sequences of {max(positions) + max_offset + 1 + lag} positions; these have {seq}")
    clean = {} if clean is None else clean
    if losses is None:
        return _cached_lm_effects(model, inputs, edit_at, positions, max_offset, batch_size, clean, head)
    effects = np.empty((len(inputs), len(positions), max_offset + 1))
    for index, t in enumerate(positions):
        length = t + max_offset + 1 + lag
        if length not in clean:
            clean[length] = losses(model, inputs[:, :length], batch_size)
        with intervene(model, edit_at(t)):
            edited = losses(model, inputs[:, :length], batch_size)
        effects[:, index] = edited[:, t:] - clean[length][:, t:]
    return effects


def _cached_lm_effects(model: PreTrainedModel, tokens: torch.Tensor, edit_at: Callable[[int], Edit],
                       positions: Sequence[int], max_offset: int, batch_size: int, clean: dict,
                       head: int) -> np.ndarray:
    """:func:`path_effects` for a causal LM (its ``head``): the unedited prefix of each (batch, t) cached in
    ``clean``."""
    device = next(model.parameters()).device
    effects = np.empty((len(tokens), len(positions), max_offset + 1))
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start: start + batch_size].to(device)
        for index, t in enumerate(positions):
            chunk = batch[:, t: t + max_offset + 1 + head]  # positions t … t + max_offset + head
            key = (start, t, max_offset)
            if key not in clean:
                prefix = _prefix(model, batch[:, :t], head) if t > 0 else None
                clean[(start, t)] = prefix
                clean[key] = _chunk_losses(model, chunk, prefix, head)
            edit = edit_at(0)
            below = min(edit.residual_layer, len(decoder_blocks(model)) - (head > 1))  # a head k > 1 reads h[L − 1]
            if below > 0 and (key, below) not in clean:
                clean[(key, below)] = _block_output(model, chunk, clean[(start, t)], head, below - 1)
            with intervene(model, edit), _replayed(model, below, clean.get((key, below))):
                edited = _chunk_losses(model, chunk, clean[(start, t)], head)
            effects[start: start + len(batch), index] = (edited - clean[key]).numpy()
    return effects


def _block_output(model: PreTrainedModel, chunk: torch.Tensor, prefix: tuple | None, head: int, block: int):
    """What decoder block ``block`` returns for ``chunk`` run (unedited) after the cached ``prefix``: its output
    h[block + 1] [batch, len(chunk), d_model], as the block returns it (a tensor, or a tuple led by one)."""
    recorded = []
    handle = decoder_blocks(model)[block].register_forward_hook(lambda module, args, output: recorded.append(output))
    try:
        _chunk_losses(model, chunk, prefix, head)
    finally:
        handle.remove()
    return recorded[0]


@contextmanager
def _replayed(model: PreTrainedModel, below: int, output) -> Iterator[None]:
    """Within the context, decoder blocks 0 … ``below`` − 1 do not run: each returns ``output``, block below − 1's
    output in an unedited run of the same tokens (:func:`_block_output`), so that block ``below`` gets its true
    input and an edit at h[below] costs only the blocks above (for SmolLM2's layer 15 of 30, half of them). Exact:
    the blocks under an edit compute the same thing edited or not. Their key/value caches are not extended by the
    run, and nothing reads them after it (the caches are copies, dropped). Hooks on the replayed blocks still run
    (an edit at h[below] edits block below − 1's replayed output)."""
    blocks = decoder_blocks(model)[:below]

    def replay(*args, **kwargs):  # a fresh tensor each call: later blocks may not write into the recorded one
        if isinstance(output, tuple):
            return (output[0].clone(), *output[1:])
        return output.clone()

    own = [block.__dict__.get("forward") for block in blocks]  # a forward set on the instance (accelerate's hooks)
    for block in blocks:
        block.forward = replay  # an instance attribute: nn.Module.__call__ (and its hooks) call it
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _prefix(model: PreTrainedModel, tokens: torch.Tensor, head: int) -> tuple:
    """The key/value state after ``tokens`` [batch, t]: the model's cache and, for a ``head`` k > 1, the head's own
    (its attention reads its own keys and values of earlier positions)."""
    if head == 1:
        return _cache(_run(model, tokens)), None
    with trunk_output(model) as trunk:
        cache = _cache(_run(model, tokens))
    own = DynamicCache(config=model.config)  # layers like the model's: the head reads its last block's kind
    head_logits(model, head, trunk, own)
    return cache, own


def _chunk_losses(model: PreTrainedModel, chunk: torch.Tensor, prefix: tuple | None, head: int) -> torch.Tensor:
    """The cross-entropy of ``head`` [batch, len(chunk) − head] (float64; head 1: the next token) of ``chunk`` run
    after the cached ``prefix`` (None: from position 0); the caches are copied, the continuation appending to the
    copies."""
    cache, own = (None, None) if prefix is None else (copy.deepcopy(part) for part in prefix)
    if head == 1:
        logits = _run(model, chunk, cache).logits
    else:
        with trunk_output(model) as trunk:
            _run(model, chunk, cache)
        logits = head_logits(model, head, trunk, own if own is not None else DynamicCache(config=model.config))
    return next_token_loss(logits, chunk, reduction="none", offset=head).double().cpu()
