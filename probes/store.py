"""The probe store: a probe grid's held-out scores and its fitted probes, fitted once and read back afterwards.

Both files are keyed by everything that decides their numbers — the residuals' weights and tokens, the (layer, τ)
grid, every fitting setting and the probe split where it is not the settings' own split of the tokens (a split by
documents) — and checked against the residuals' content when read, so nothing stale or
damaged is reused (:meth:`probes.future.ProbeScores.load`, :meth:`probes.future.FittedProbes.load`):

    <store>/<kind>-<key>.npz              per-example held-out scores
    <store>/<kind>-<key>-validation.npz   per-example scores on the probes' validation sequences (best layers)
    <store>/<kind>-<key>.safetensors      the probes: weights, biases, standardisation, classes
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from transformers import PreTrainedModel

from forethought.core.precision import autocast
from forethought.models.families import unembedding
from forethought.probes.cache import ResidualCache
from forethought.probes.future import (
    FittedProbes,
    FutureProbeConfig,
    ProbeScores,
    fit_future_probes,
    score_future_probes,
)
from forethought.probes.split import ProbeSplit


def probe_scores(cache: ResidualCache, model: PreTrainedModel, taus: list[int], config: FutureProbeConfig,
                 store: Path, progress: bool = False, split: ProbeSplit | None = None) -> ProbeScores:
    """Held-out scores of every (layer, τ) probe of ``config`` on ``cache`` (the residuals of ``model``): fitted
    once into ``store`` (on ``split``, default ``config.split`` of the cached tokens), then read back."""
    paths, made_from = _stored(cache, taus, config, store, split)
    if paths["scores"].is_file():
        return ProbeScores.load(paths["scores"], made_from)
    return _fit(cache, model, taus, config, paths, made_from, progress, split)[1]


def fitted_probes(cache: ResidualCache, model: PreTrainedModel, taus: list[int], config: FutureProbeConfig,
                  store: Path, progress: bool = False, split: ProbeSplit | None = None) -> FittedProbes:
    """The fitted probes behind :func:`probe_scores` (same arguments): read from ``store``, or fitted there (a
    store written before probes were kept holds scores only: its probes are fitted again, alike for the same
    seed and thread count, and its scores kept as they are)."""
    paths, made_from = _stored(cache, taus, config, store, split)
    if paths["probes"].is_file():
        return FittedProbes.load(paths["probes"], made_from, unembedding(model) if config.kind == "lens" else None)
    return _fit(cache, model, taus, config, paths, made_from, progress, split)[0]


def validation_scores(cache: ResidualCache, model: PreTrainedModel, taus: list[int], config: FutureProbeConfig,
                      store: Path, progress: bool = False, split: ProbeSplit | None = None) -> ProbeScores:
    """The fitted probes' scores on their own validation sequences (same arguments as :func:`probe_scores`): where a
    best layer is chosen, so that its test score stays an honest estimate. Scored once into ``store``."""
    paths, made_from = _stored(cache, taus, config, store, split)
    path = paths["scores"].with_name(f"{paths['scores'].stem}-validation.npz")
    if path.is_file():
        return ProbeScores.load(path, made_from)
    fitted = fitted_probes(cache, model, taus, config, store, progress, split)
    validation = (split or config.split(cache.tokens)).validation
    with autocast(config.device, config.precision):
        scores = score_future_probes(fitted, cache, validation, config.batch_sequences)
    scores.save(path, made_from)
    return scores


def _stored(cache: ResidualCache, taus: list[int], config: FutureProbeConfig, store: Path,
            split: ProbeSplit | None) -> tuple[dict[str, Path], str]:
    """The grid's files in ``store`` and the digest of what they are made from (the residuals' content)."""
    key = {"weights_hash": cache.meta["weights_hash"], "tokens_hash": cache.meta["tokens_hash"],
           "layers": cache.layers, "taus": taus, **{k: v for k, v in asdict(config).items()
                                                    if k != "device" and (k != "hidden" or config.kind == "mlp")}}
    if split is not None and split.digest() != config.split(cache.tokens).digest():
        key["split"] = split.digest()  # the settings' own split keeps the key it always had
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    stem = f"{config.kind}{'-untrained' if config.max_epochs == 0 else ''}-{digest}"
    made_from = cache.meta["digests"] | {"key": digest}  # the residuals' content, not only their names
    made_from = hashlib.blake2b(json.dumps(made_from, sort_keys=True).encode(), digest_size=16).hexdigest()
    return {"scores": store / f"{stem}.npz", "probes": store / f"{stem}.safetensors"}, made_from


def _fit(cache: ResidualCache, model: PreTrainedModel, taus: list[int], config: FutureProbeConfig,
         paths: dict[str, Path], made_from: str, progress: bool,
         split: ProbeSplit | None) -> tuple[FittedProbes, ProbeScores]:
    """Fit the grid; store the probes (trained ones: an untrained lens is the model's own readout), and the scores
    unless stored already (they stay as first written)."""
    model = model.to(config.device)
    unembed = unembedding(model) if config.kind == "lens" else None
    fitted, scores = fit_future_probes(cache, cache.layers, taus, config, vocab_size=model.config.vocab_size,
                                       unembed=unembed, progress=progress and config.max_epochs > 0, split=split)
    if config.max_epochs > 0:
        fitted.save(paths["probes"], made_from)
    if paths["scores"].is_file():
        return fitted, ProbeScores.load(paths["scores"], made_from)
    scores.save(paths["scores"], made_from)
    return fitted, scores
