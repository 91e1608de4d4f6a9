"""Held-out evaluation of language-model checkpoints: the data they hold out, a sample of it that represents the
corpus, and their per-token losses.

The sample is drawn by *document*, never as the first windows of the test split (which on a mixed corpus are all
one text): a seeded random sample of test documents, stratified by text (each text gets its share of the test
split's sequences), cut so that no document is in two clusters (:meth:`TokenFile.document_sequences`). Every
held-out interval resamples these clusters, and the probes are split by them, so a document never sits on both
sides of a probe split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from forethought.core.errors import ForethoughtError
from forethought.core.progress import progress_bar
from forethought.models.lm import LMCheckpoint
from forethought.models.mtp import head_logits, trunk_output
from forethought.models.tasks.embedded import EMBEDDED
from forethought.models.tasks.text import TextData, TokenFile, document_texts, next_token_loss

log = logging.getLogger(__name__)

BLOCK_SEQUENCES = 4  # packed layout: windows per cluster of whole documents (~1/8 of the tokens dropped)


def heldout_data(checkpoints: dict[str, LMCheckpoint], corpus: str | None, layout: str, seq_len: int,
                 prepend_bos: bool | None = None) -> TextData:
    """The checkpoints' own data (their test documents are held out), or ``corpus`` cut by layout and length — the
    embedded corpus, said in a warning, where neither is known; ``prepend_bos`` (None: as the data was recorded,
    or no BOS for ``corpus``) sets the BOS policy."""
    if corpus is not None:
        return TextData(corpus=corpus, layout=layout, seq_len=seq_len, prepend_bos=bool(prepend_bos))
    recorded = next((c.data() for c in checkpoints.values() if c.data() is not None), None)
    if recorded is None:  # a pretrained model: read on the embedded default, as the main job is
        log.warning("the checkpoints record no training data (trained elsewhere): held-out text from the embedded "
                    "corpus; give `corpus` to choose another")
        return TextData(corpus=EMBEDDED, layout=layout, seq_len=seq_len, prepend_bos=bool(prepend_bos))
    return recorded if prepend_bos is None else replace(recorded, prepend_bos=prepend_bos)


@dataclass(frozen=True)
class HeldOutSample:
    """Held-out sequences and where they come from: the tokens probed or evaluated, each sequence's cluster (the
    document, or block of whole documents, it was cut from: the unit every interval resamples) and text."""

    tokens: np.ndarray  # [n, seq_len] int64
    clusters: np.ndarray  # [n] int64: no document is in two clusters
    texts: np.ndarray  # [n] str: the embedded text (or the corpus) of each sequence
    description: str  # how it was drawn, in words (meta.json)

    def __post_init__(self):
        if not len(self.tokens) == len(self.clusters) == len(self.texts):
            raise ForethoughtError("a held-out sample needs one cluster and one text per sequence")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def text_names(self) -> list[str]:
        """The texts the sample holds, in first-seen order."""
        return list(dict.fromkeys(self.texts.tolist()))

    def spread(self, n: int) -> np.ndarray:
        """Indices of ``n`` sequences spread evenly over the sample (which runs text by text): a smaller sample of
        the same composition, for a costlier measurement."""
        return np.unique(np.linspace(0, len(self) - 1, min(n, len(self))).round().astype(int))

    def composition(self) -> dict[str, Any]:
        """For ``meta.json``: how it was drawn, and per text its sequences and clusters."""
        return {"sample": self.description, "sequences": len(self), "clusters": int(len(np.unique(self.clusters))),
                "by_text": {text: {"sequences": int((self.texts == text).sum()),
                                   "clusters": int(len(np.unique(self.clusters[self.texts == text])))}
                            for text in self.text_names}}


def heldout_sample(data: TextData, tokenizer: PreTrainedTokenizerBase, tokens_root: str | Path,
                   max_sequences: int | None, seed: int) -> HeldOutSample:
    """A seeded sample of ``data``'s test documents: ``max_sequences`` sequences (None, or more than the test split
    holds: all of it), stratified by text (:func:`sample_documents`)."""
    tokens, parts = data.documents(tokenizer, tokens_root)
    test = parts["test"]
    sequences, clusters, texts = sample_documents(
        tokens, test, document_texts(data.corpus, tokens.n_documents)[test], data.seq_len - data.prepend_bos,
        data.layout, tokenizer.eos_token_id, max_sequences, seed)
    if len(sequences) == 0:
        raise ForethoughtError(f"the test split of {data.corpus} ({len(test)} documents) gives no sequence of "
                               f"{data.seq_len} tokens ({data.layout} layout)")
    drawn = ("every test document" if max_sequences is None or len(sequences) < max_sequences else
             f"a seeded sample (seed {seed}) of test documents, stratified by text")
    return HeldOutSample(data.with_bos(sequences, tokenizer), clusters, texts,
                         f"{drawn}; {data.layout} sequences of {data.seq_len} tokens, clusters of whole documents")


def sample_documents(tokens: TokenFile, documents: np.ndarray, texts: np.ndarray, length: int, layout: str,
                     separator: int | None, max_sequences: int | None,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``max_sequences`` sequences [n, length] (None: every one) cut from a seeded sample of ``documents``, with
    their clusters [n] and texts [n] (``texts`` [len(documents)]: each document's).

    Stratified by text: each text's quota is its share of all the sequences the documents give (largest
    remainders), filled from its documents in a seeded random order, then cut (sorted) with
    :meth:`TokenFile.document_sequences`; a text's last block is thinned at random to its quota.
    """
    rng = np.random.default_rng(seed)

    def cut(chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return tokens.document_sequences(length, layout, np.sort(chosen), separator, BLOCK_SEQUENCES)

    strata = {text: rng.permutation(documents[texts == text]) for text in dict.fromkeys(texts.tolist())}
    whole = {text: len(cut(chosen)[0]) for text, chosen in strata.items()}
    total = sum(whole.values())
    quotas = _quotas(whole, total if max_sequences is None else min(max_sequences, total))
    pieces = [(np.zeros((0, length), np.int64), np.zeros(0, np.int64), np.zeros(0, dtype=object))]
    for text, chosen in strata.items():
        taken = len(chosen) if quotas[text] == whole[text] else _documents_for(chosen, quotas[text], cut)
        sequences, clusters = cut(chosen[:taken])
        keep = np.sort(rng.permutation(len(sequences))[: quotas[text]])
        pieces.append((sequences[keep], clusters[keep], np.full(len(keep), text, dtype=object)))
    sequences, clusters, names = (np.concatenate(part) for part in zip(*pieces))
    return sequences, clusters.astype(np.int64), names


def _quotas(available: dict[str, int], wanted: int) -> dict[str, int]:
    """``wanted`` sequences shared among the texts in proportion to what each holds (largest remainders)."""
    total = sum(available.values())
    exact = {text: wanted * count / total for text, count in available.items()}
    quotas = {text: int(share) for text, share in exact.items()}
    for text in sorted(exact, key=lambda t: quotas[t] - exact[t])[: wanted - sum(quotas.values())]:
        quotas[text] += 1
    return quotas


def _documents_for(documents: np.ndarray, quota: int, cut) -> int:
    """How many of ``documents`` (in their order) give at least ``quota`` sequences when cut (binary search)."""
    low, high = 1, len(documents)
    while low < high:
        middle = (low + high) // 2
        if len(cut(documents[:middle])[0]) >= quota:
            high = middle
        else:
            low = middle + 1
    return low


def device_batches(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int, desc: str,
                   progress: bool) -> Iterator[torch.Tensor]:
    """Chunks [≤ batch_size, T] of ``sequences`` on the model's device, with a progress bar."""
    device = next(model.parameters()).device
    for chunk in progress_bar(sequences.split(batch_size), desc=desc, disable=not progress, leave=False):
        yield chunk.to(device)


@torch.no_grad()
def token_losses(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 32,
                 progress: bool = False, head: int = 1) -> np.ndarray:
    """sequences [n, T] → per-token cross-entropy [n, T − head], nats: position t predicts token t + 1 (head 1, the
    model's own prediction), or with ``head`` k > 1 the extra head k of a multi-token model predicts token t + k
    (the model carries its heads: :meth:`~models.lm.LMCheckpoint.with_heads`)."""
    def losses(chunk: torch.Tensor) -> torch.Tensor:
        if head == 1:
            return next_token_loss(model(chunk, use_cache=False).logits, chunk, reduction="none")
        with trunk_output(model) as trunk:  # head k alone, not every head
            model(chunk, use_cache=False)
        return next_token_loss(head_logits(model, head, trunk), chunk, reduction="none", offset=head)

    return torch.cat([losses(chunk).cpu() for chunk in device_batches(model, sequences, batch_size, "losses",
                                                                      progress)]).double().numpy()
