"""Held-out evaluation of language-model checkpoints: the data they hold out, and their per-token losses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from forethought.core.errors import ForethoughtError
from forethought.models.lm import LMCheckpoint
from forethought.models.tasks.text import TextData, next_token_loss


def heldout_data(checkpoints: dict[str, LMCheckpoint], corpus: str | None, layout: str, seq_len: int,
                 prepend_bos: bool | None = None) -> TextData:
    """The checkpoints' own data (their test documents are held out), or ``corpus`` cut by layout and length;
    ``prepend_bos`` (None: as the data was recorded, or no BOS for ``corpus``) sets the BOS policy."""
    if corpus is not None:
        return TextData(corpus=corpus, layout=layout, seq_len=seq_len, prepend_bos=bool(prepend_bos))
    recorded = next((c.data() for c in checkpoints.values() if c.data() is not None), None)
    if recorded is None:
        raise ForethoughtError("the checkpoints record no training data (trained elsewhere?): pass --corpus, "
                               "e.g. --corpus embedded")
    return recorded if prepend_bos is None else replace(recorded, prepend_bos=prepend_bos)


def device_batches(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int, desc: str,
                   progress: bool) -> Iterator[torch.Tensor]:
    """Chunks [≤ batch_size, T] of ``sequences`` on the model's device, with a progress bar."""
    device = next(model.parameters()).device
    for chunk in tqdm(sequences.split(batch_size), desc=desc, disable=not progress, leave=False):
        yield chunk.to(device)


@torch.no_grad()
def token_losses(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 32,
                 progress: bool = False) -> np.ndarray:
    """sequences [n, T] → per-token cross-entropy [n, T − 1] (position t predicts token t + 1), nats."""
    losses = [next_token_loss(model(chunk, use_cache=False).logits, chunk, reduction="none").cpu()
              for chunk in device_batches(model, sequences, batch_size, "losses", progress)]
    return torch.cat(losses).double().numpy()
