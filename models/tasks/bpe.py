"""A byte-level BPE vocabulary fitted to a corpus's training documents (``--tokenizer bpe:N``).

A small model spends most of its step in the unembedding when the vocabulary is GPT-2's 50,257 tokens; a
vocabulary fitted to the corpus (4,096 tokens by default) lets a CPU model learn language in minutes. The
BPE is trained with Hugging Face ``tokenizers`` on the training split only (the held-out documents never
shape the vocabulary), with GPT-2's byte-level pre-tokenizer and ``<|endoftext|>`` as BOS and EOS, and
saved as standard tokenizer files, so ``AutoTokenizer``, ``TransformerBridge`` and every analysis load it
like any other. It is fitted once per (corpus, split, size) into ``<tokens_root>/bpe-…`` and reused, so the
twins of a pair share it byte for byte; every checkpoint carries a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from forethought.core.errors import ForethoughtError
from forethought.core.files import remove_path
from forethought.models.tasks.text import TextData, iter_documents, source_fingerprint, split_documents

BPE_PREFIX = "bpe"
DEFAULT_BPE_SIZE = 4096
END_OF_TEXT = "<|endoftext|>"
_MIN_SIZE, _MAX_SIZE = 257, 65536  # the 256 bytes + <|endoftext|>; token files are uint16


def bpe_size(spec: str) -> int | None:
    """``bpe`` → 4,096, ``bpe:N`` → N, anything else (a model source) → None. Refuses sizes that cannot be."""
    if spec != BPE_PREFIX and not spec.startswith(BPE_PREFIX + ":"):
        return None
    text = spec.partition(":")[2] if ":" in spec else str(DEFAULT_BPE_SIZE)
    if not text.isdigit() or not _MIN_SIZE <= int(text) <= _MAX_SIZE:
        raise ForethoughtError(f"`tokenizer` {spec}: the BPE size must be an integer from {_MIN_SIZE} to {_MAX_SIZE}")
    return int(text)


def fit_bpe(documents, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` included) trained on ``documents``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, model_max_length=1 << 20)


def bpe_folder(data: TextData, vocab_size: int, tokens_root: str | Path) -> Path:
    """Where the BPE of ``data``'s training documents is kept: one folder per (corpus, split, size)."""
    source = {"data": {k: v for k, v in asdict(data).items() if k not in ("layout", "seq_len", "prepend_bos")},
              "content": source_fingerprint(data.corpus), "vocab_size": vocab_size}
    digest = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:8]
    return Path(tokens_root) / f"bpe-{vocab_size}-{digest}"


def corpus_bpe(data: TextData, vocab_size: int, tokens_root: str | Path = "runs/tokens") -> PreTrainedTokenizerBase:
    """The BPE of ``data``'s training documents: loaded if fitted before, else fitted (a few seconds for the
    embedded corpus) and saved atomically."""
    folder = bpe_folder(data, vocab_size, tokens_root)
    if not (folder / "tokenizer.json").is_file():
        def documents() -> Iterator[str]:
            return islice(iter_documents(data.corpus, data.corpus_split, data.text_field), data.max_documents)

        n_documents = sum(1 for _ in documents())
        train = set(split_documents(n_documents, data.split_fractions, data.split_seed)[0].tolist())
        tokenizer = fit_bpe((text for i, text in enumerate(documents()) if i in train), vocab_size)
        if len(tokenizer) < vocab_size:
            raise ForethoughtError(f"the training documents of {data.corpus} give a BPE of only {len(tokenizer)} "
                                   f"tokens; ask for `tokenizer` bpe:{len(tokenizer)} or fewer")
        staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer.save_pretrained(staging)
        (staging / "forethought-bpe.json").write_text(json.dumps(
            {"fitted_on": "training documents", "n_documents": len(train), "vocab_size": vocab_size,
             "data": asdict(data)}, indent=2) + "\n")
        if folder.exists():  # fitted meanwhile by another process, or left incomplete: keep one whole copy
            remove_path(folder)
        os.replace(staging, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if len(tokenizer) != vocab_size:
        raise ForethoughtError(f"{folder} holds a BPE of {len(tokenizer)} tokens, not {vocab_size}; remove it")
    return tokenizer
