"""The on-disk activation cache: residual streams of a checkpoint over token data, one float16 memmap a layer.

Layout of a cache folder::

    <cache>/meta.json          checkpoint, weights hash, processing mode, route, hooks, layers, shapes, dtype, versions
    <cache>/tokens.npy         [n_sequences, seq] int64: the inputs
    <cache>/layer_00.npy ...   [n_sequences, seq, d_model] float16: h[l] (DESIGN.md's layer convention)

It is written into ``<cache>.partial/`` chunk by chunk (memory bounded by one chunk, whatever the corpus
size), with ``progress.json`` recording the sequences done after each chunk is flushed; rerunning the same
call resumes there. The folder is renamed to ``<cache>`` only when complete (atomic), so a crash never leaves
a cache that looks finished. ``meta.json`` records every file's content digest (BLAKE2b): :meth:`ResidualCache.open`
checks shapes, types and the tokens, and each layer file is checked the first time it is read, so a cache
changed after it was written (NaN bytes, overwritten rows, shifted tokens) is refused, never used.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from forethought.core.errors import ForethoughtError
from forethought.core.files import atomic_write_json, check_digest, check_free_space, file_digest, read_json, size_text
from forethought.core.precision import autocast, check_precision
from forethought.core.progress import progress_bar
from forethought.core.threads import thread_settings
from forethought.core.versions import package_versions
from forethought.models.families import decoder_blocks
from forethought.models.lm import LMCheckpoint
from forethought.probes.residuals import bridge_over_copy, hook_name, read_layers

log = logging.getLogger(__name__)
PROCESSING_MODE = "raw Hugging Face weights (no weight processing)"
OLDER_PROCESSING_MODES = ("raw Hugging Face weights (TransformerBridge, no weight processing)",)  # the same weights
ROUTE = "forward hooks on the model's decoder blocks"  # caches made before 2026-12: through a TransformerBridge
_PROGRESS = "progress.json"


WEIGHTS_HASHED = "model"  # what weights_hash digests: the model's own state dict (older caches: the bridge's)


def weights_hash(model: PreTrainedModel) -> str:
    """A digest of every parameter and buffer (names, shapes, bytes): two caches of one model agree."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # the buffer, not a copy
    return digest.hexdigest()


def _layer_file(layer: int) -> str:
    return f"layer_{layer:02d}.npy"


@dataclass
class ResidualCache:
    """A finished cache: tokens [n, seq] and, per layer, residuals [n, seq, d_model] float16 (memmaps)."""

    folder: Path
    tokens: np.ndarray
    meta: dict[str, Any]
    verified: set[int] = field(default_factory=set)  # layers whose file matched its digest in this process

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def d_model(self) -> int:
        return self.meta["d_model"]

    def read(self, sequences: np.ndarray, layers: Sequence[int]) -> np.ndarray:
        """h[l] of the given sequences for each of ``layers``: [len(layers), len(sequences), seq, d_model]."""
        return np.stack([self.layer(layer)[sequences] for layer in layers])

    def layer(self, layer: int) -> np.ndarray:
        """h[layer] for every sequence: a read-only memmap [n_sequences, seq, d_model] (its file's digest is
        checked on the first read)."""
        if layer not in self.layers:
            raise ForethoughtError(f"layer {layer} is not in the cache {self.folder} (it holds layers {self.layers})")
        path = self.folder / _layer_file(layer)
        if layer not in self.verified:
            check_digest(path, self.meta["digests"][path.name], _rebuild(self.folder))
            self.verified.add(layer)
        return np.load(path, mmap_mode="r")

    @classmethod
    def open(cls, folder: str | Path) -> ResidualCache:
        """Open a finished cache, checking that every file has the shape and type ``meta.json`` says."""
        folder = Path(folder)
        if not (folder / "meta.json").is_file():
            partial = _partial(folder)
            state = "an unfinished cache (run the same call again to resume)" if partial.exists() else "no cache"
            raise ForethoughtError(f"{folder} holds {state}")
        meta = read_json(folder / "meta.json", _rebuild(folder))
        if "digests" not in meta:
            raise ForethoughtError(f"{folder} is a cache without content digests (made by an older forethought); "
                                   f"{_rebuild(folder)}")
        n, seq, d_model = meta["n_sequences"], meta["seq_len"], meta["d_model"]
        check_digest(folder / "tokens.npy", meta["digests"]["tokens.npy"], _rebuild(folder))
        tokens = _checked(folder / "tokens.npy", (n, seq), np.int64)
        if _tokens_hash(tokens) != meta["tokens_hash"]:
            raise ForethoughtError(f"{folder}/tokens.npy holds other tokens than meta.json records; {_rebuild(folder)}")
        for layer in meta["layers"]:
            _checked(folder / _layer_file(layer), (n, seq, d_model), np.dtype(meta["dtype"]))
        return cls(folder, tokens, meta)


def _checked(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:  # missing, truncated, or not an .npy file
        raise ForethoughtError(f"{path} is missing, truncated or corrupt ({error})") from None
    if array.shape != shape or array.dtype != dtype:
        raise ForethoughtError(
            f"{path} holds {array.dtype}{list(array.shape)}, meta.json says {np.dtype(dtype)}{list(shape)}"
        )
    return array


def _rebuild(folder: Path) -> str:
    return f"remove {folder} and run the same command again to rebuild the cache"


def _tokens_hash(tokens: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(tokens).tobytes(), digest_size=16).hexdigest()


_SAME_CACHE = ("weights_hash", "tokens_hash", "layers", "processing_mode", "precision", "dtype")  # what must match


def _partial(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


def cache_bytes(n_sequences: int, seq_len: int, d_model: int, n_layers: int, dtype=np.float16) -> int:
    """Bytes a cache of these sizes takes on disk (residuals + tokens)."""
    return n_sequences * seq_len * (n_layers * d_model * np.dtype(dtype).itemsize + 8)


def build_cache(
    checkpoint: LMCheckpoint | str | Path,
    tokens: np.ndarray,
    folder: str | Path,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    precision: str = "float32",
) -> ResidualCache:
    """Cache h[l] of ``checkpoint`` (a loaded :class:`~models.lm.LMCheckpoint`, or any
    :func:`models.sources.model_folder` source, loaded here) over ``tokens`` [n, seq] — exactly those tokens: nothing
    (no BOS) is added. ``precision``: the forward pass's (recorded).

    A finished cache of the same weights, data, layers and precision is reused without running the model (one
    beside ``folder``, made under another name for the same weights, is hard-linked into it); an interrupted one
    resumes; one of anything else is refused with what differs. Needs and checks the disk space
    before writing. The residuals are read by forward hooks on the model's own decoder blocks
    (:func:`probes.residuals.read_layers`: the model's forward pass and nothing more, in eval mode, equal to what a
    TransformerLens bridge reads at the same hook names); the model is left as it was.
    """
    folder, tokens = Path(folder), np.ascontiguousarray(tokens, dtype=np.int64)
    if tokens.ndim != 2 or tokens.size == 0:
        raise ForethoughtError(f"tokens must be a non-empty [n_sequences, seq] array, got shape {tokens.shape}")
    check_precision(precision)
    if not isinstance(checkpoint, LMCheckpoint):
        checkpoint = LMCheckpoint.load(checkpoint)
    model = checkpoint.model
    n_layers, d_model = len(decoder_blocks(model)), model.config.hidden_size
    layers = list(range(n_layers + 1)) if layers is None else sorted(set(layers))
    meta = {
        "checkpoint": checkpoint.source,
        "weights_hash": weights_hash(model),
        "weights_hashed": WEIGHTS_HASHED,
        "processing_mode": PROCESSING_MODE,
        "route": ROUTE,
        "precision": precision,
        "layers": layers,
        "hooks": [hook_name(layer) for layer in layers],
        "n_sequences": len(tokens),
        "seq_len": tokens.shape[1],
        "d_model": d_model,
        "dtype": "float16",
        "tokens_hash": _tokens_hash(tokens),
        "versions": package_versions(),
    }
    if not (folder / "meta.json").is_file() and (same := _same_cache(folder, meta)) is not None:
        _link_cache(same, folder)  # another name for the same weights: its files, linked, not recomputed
    if (folder / "meta.json").is_file():
        return _reuse(folder, meta, checkpoint)
    partial = _partial(folder)
    done = _resume_point(partial, meta)
    if done == 0:
        needed = cache_bytes(len(tokens), tokens.shape[1], d_model, len(layers))
        log.info("caching needs about %s in %s", size_text(needed), folder.parent)
        check_free_space(folder.parent, needed, "caching")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.save(partial / "tokens.npy", tokens)
        for layer in layers:
            np.lib.format.open_memmap(partial / _layer_file(layer), mode="w+", dtype=np.float16,
                                      shape=(len(tokens), tokens.shape[1], d_model)).flush()
        _write_progress(partial, meta, 0)
    outputs = {layer: np.load(partial / _layer_file(layer), mmap_mode="r+") for layer in layers}
    starts = range(done, len(tokens), batch_size)
    runnable = _on_device(model, device)
    for start in progress_bar(starts, desc=f"caching {folder.name}", disable=not progress, leave=False):
        chunk = torch.from_numpy(tokens[start : start + batch_size]).to(device)
        with autocast(device, precision):
            captured = read_layers(runnable, chunk, layers)  # {layer: [b, seq, d_model]}
        for layer in layers:
            outputs[layer][start : start + len(chunk)] = captured[layer].to(torch.float16).cpu().numpy()
            outputs[layer].flush()
        _write_progress(partial, meta, start + len(chunk))
    del outputs
    (partial / _PROGRESS).unlink()
    files = ["tokens.npy", *(_layer_file(layer) for layer in layers)]
    digests = {name: file_digest(partial / name) for name in files}
    atomic_write_json(partial / "meta.json", {**meta, **thread_settings(), "digests": digests})
    os.replace(partial, folder)  # complete from here on
    return ResidualCache.open(folder)


def _on_device(model: PreTrainedModel, device: str) -> PreTrainedModel:
    """``model`` where it is on ``device``, else a copy moved there (the caller's model stays where it was)."""
    where, wanted = next(model.parameters()).device, torch.device(device)
    there = where.type == wanted.type and wanted.index in (None, where.index)
    return model if there else copy.deepcopy(model).to(wanted)


def _same_cache(folder: Path, meta: dict[str, Any]) -> Path | None:
    """A finished cache beside ``folder`` (under another checkpoint's name) of the same weights, tokens, layers,
    processing, precision and dtype, if any."""
    if not folder.parent.is_dir():
        return None
    for sibling in sorted(folder.parent.iterdir()):
        try:
            saved = read_json(sibling / "meta.json", "") if sibling != folder else None
        except (ForethoughtError, OSError):  # not a finished cache (or a damaged one): not a match
            continue
        if isinstance(saved, dict) and all(saved.get(key) == meta[key] for key in _SAME_CACHE):
            return sibling
    return None


def _link_cache(source: Path, folder: Path) -> None:
    """``folder`` as a copy of the finished cache ``source``: its files hard-linked (copied where the file system
    cannot link), made in a staging folder and renamed into place."""
    staging = folder.with_name(f".{folder.name}.link-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for path in source.iterdir():
        if path.is_file() and not path.is_symlink():
            try:
                os.link(path, staging / path.name)
            except OSError:
                shutil.copy2(path, staging / path.name)
    os.rename(staging, folder)
    log.info("%s: the cache of the same weights in %s, linked", folder.name, source)


def _reuse(folder: Path, meta: dict[str, Any], checkpoint: LMCheckpoint) -> ResidualCache:
    """The finished cache in ``folder``, if it holds these weights, tokens, layers, processing, precision and
    dtype (a cache of the older route holds the same residuals, up to the attention kernel's rounding: reused)."""
    cache = ResidualCache.open(folder)
    keys = _SAME_CACHE
    saved = {"precision": "float32", **cache.meta}  # caches made before the setting existed ran in float32
    if saved.get("processing_mode") in OLDER_PROCESSING_MODES:
        saved["processing_mode"] = PROCESSING_MODE
    if saved.get("weights_hashed") != WEIGHTS_HASHED:  # made before 2026-12: hashed as the bridge wraps the model
        meta = {**meta, "weights_hash": weights_hash(bridge_over_copy(checkpoint, "cpu").original_model)}
    differing = [key for key in keys if saved.get(key) != meta[key]]
    if differing:
        raise ForethoughtError(
            f"{folder} holds a cache of other {', '.join(differing)} (of {cache.meta['checkpoint']}); "
            "choose another folder or remove it"
        )
    return cache


def _resume_point(partial: Path, meta: dict[str, Any]) -> int:
    """Sequences already written by an interrupted run of the same cache (0: start afresh)."""
    progress_file = partial / _PROGRESS
    if not progress_file.is_file():
        return 0
    progress = read_json(progress_file, f"remove {partial} to start the cache afresh")
    if progress["meta"] != meta:
        raise ForethoughtError(f"{partial} holds an unfinished cache of another checkpoint or data; remove it")
    return progress["done"]


def _write_progress(partial: Path, meta: dict[str, Any], done: int) -> None:
    atomic_write_json(partial / _PROGRESS, {"meta": meta, "done": done}, indent=None)

