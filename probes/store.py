"""The probe-score store: held-out scores of a probe grid, fitted once and read back from disk afterwards.

A stored file is keyed by everything that decides its numbers — the residuals' weights and tokens, the (layer, τ)
grid and every fitting setting — and checked against the residuals' content when read, so nothing stale or
damaged is reused (:meth:`probes.future.ProbeScores.load`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from transformers import PreTrainedModel

from models.families import unembedding
from probes.cache import ResidualCache
from probes.future import FutureProbeConfig, ProbeScores, fit_future_probes
from probes.split import ProbeSplit


def probe_scores(cache: ResidualCache, model: PreTrainedModel, taus: list[int], config: FutureProbeConfig,
                 store: Path, progress: bool = False, split: ProbeSplit | None = None) -> ProbeScores:
    """Held-out scores of every (layer, τ) probe of ``config`` on ``cache`` (the residuals of ``model``): fitted
    once into ``store`` (on ``split``, default ``config.split`` of the cached tokens), then read back."""
    key = {"weights_hash": cache.meta["weights_hash"], "tokens_hash": cache.meta["tokens_hash"],
           "layers": cache.layers, "taus": taus, **{k: v for k, v in asdict(config).items() if k != "device"}}
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    path = store / f"{config.kind}{'-untrained' if config.max_epochs == 0 else ''}-{digest}.npz"
    made_from = cache.meta["digests"] | {"key": digest}  # the residuals' content, not only their names
    made_from = hashlib.blake2b(json.dumps(made_from, sort_keys=True).encode(), digest_size=16).hexdigest()
    if path.is_file():
        return ProbeScores.load(path, made_from)
    model = model.to(config.device)
    unembed = unembedding(model) if config.kind == "lens" else None
    _, scores = fit_future_probes(cache, cache.layers, taus, config, vocab_size=model.config.vocab_size,
                                  unembed=unembed, progress=progress and config.max_epochs > 0, split=split)
    scores.save(path, made_from)
    return scores
