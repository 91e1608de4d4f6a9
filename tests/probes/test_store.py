"""The probe store: a grid fitted once is read back, and never read back for another split of the same residuals."""

from __future__ import annotations

import numpy as np
import pytest

import forethought.probes.store
from forethought.models.lm import LMCheckpoint
from forethought.probes.cache import build_cache
from forethought.probes.future import FutureProbeConfig
from forethought.probes.split import ProbeSplit
from forethought.probes.store import probe_scores

TOKENS = np.random.default_rng(0).integers(0, 23, size=(40, 9))


def test_a_stored_grid_is_read_back_only_for_the_split_it_was_fitted_on(lm_folder, tmp_path, monkeypatch):
    cache = build_cache(lm_folder, TOKENS, tmp_path / "cache", layers=[1, 2], batch_size=8, progress=False)
    model = LMCheckpoint.load(lm_folder).model
    config = FutureProbeConfig(max_epochs=1, batch_sequences=8)
    store = tmp_path / "store"
    default = probe_scores(cache, model, [1, 2], config, store)
    by_documents = config.split(TOKENS, clusters=np.arange(len(TOKENS)) // 4)  # blocks of 4 sequences a document
    assert by_documents.digest() != config.split(TOKENS).digest()
    fits = []
    real_fit = forethought.probes.store.fit_future_probes
    monkeypatch.setattr(forethought.probes.store, "fit_future_probes",
                        lambda *args, **kwargs: fits.append(kwargs["split"]) or real_fit(*args, **kwargs))
    again = probe_scores(cache, model, [1, 2], config, store, split=config.split(TOKENS))  # the same split, named
    assert fits == [] and np.array_equal(again.sequence_ids, default.sequence_ids)
    other = probe_scores(cache, model, [1, 2], config, store, split=by_documents)
    assert len(fits) == 1 and np.array_equal(np.unique(other.sequence_ids), by_documents.test)
    assert not np.array_equal(np.unique(default.sequence_ids), by_documents.test)
    assert len(list(store.glob("*.npz"))) == 2  # both grids kept, each under its own key
    probe_scores(cache, model, [1, 2], config, store, split=by_documents)
    assert len(fits) == 1  # and the second is read back in turn


@pytest.mark.parametrize("change", ["test", "classes"])
def test_the_split_digest_sees_every_part(change):
    split = ProbeSplit.of(TOKENS, 0.25, 0.1, seed=0, top_k=5)
    other = ProbeSplit(split.train, split.validation, split.test[:-1], split.classes) if change == "test" else \
        ProbeSplit(split.train, split.validation, split.test, split.classes[::-1])
    assert other.digest() != split.digest() == ProbeSplit.of(TOKENS, 0.25, 0.1, seed=0, top_k=5).digest()
