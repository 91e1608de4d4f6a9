"""The activation cache: what it stores, reuse, resume after a crash, and every way it can be wrong."""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

import forethought.probes.cache
from forethought.core.errors import ForethoughtError
from forethought.models.lm import LMCheckpoint
from forethought.probes.cache import ResidualCache, build_cache, weights_hash
from forethought.probes.residuals import bridge_residuals, load_bridge, model_residuals

TOKENS = np.random.default_rng(0).integers(0, 23, size=(10, 7))


class Crash(Exception):
    pass


def test_cache_holds_the_models_residuals_in_float16_as_the_bridge_reads_them(lm_folder, tmp_path):
    cache = build_cache(lm_folder, TOKENS, tmp_path / "cache", layers=[0, 2, 3], batch_size=4, progress=False)
    model = LMCheckpoint.load(lm_folder).model
    expected = model_residuals(model, torch.from_numpy(TOKENS), [0, 2, 3])
    via_bridge = bridge_residuals(load_bridge(lm_folder), torch.from_numpy(TOKENS), [0, 2, 3])
    assert cache.layers == [0, 2, 3] and np.array_equal(cache.tokens, TOKENS)
    for index, layer in enumerate(cache.layers):
        stored = cache.layer(layer)
        assert stored.dtype == np.float16 and stored.shape == (10, 7, 16)
        np.testing.assert_array_equal(stored, expected[index].to(torch.float16).numpy())
        np.testing.assert_allclose(stored, via_bridge[index].numpy(), rtol=1e-3, atol=1e-3)  # float16's rounding
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["hooks"] == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert meta["processing_mode"].startswith("raw") and meta["versions"]["transformer-lens"]
    assert meta["threads"] == torch.get_num_threads() and meta["deterministic_algorithms"] is False  # both recorded
    assert meta["weights_hash"] == weights_hash(LMCheckpoint.load(lm_folder).model)  # the model's own state dict
    with pytest.raises(ForethoughtError, match=r"layer 1 is not in the cache .* \(it holds layers \[0, 2, 3\]\)"):
        cache.layer(1)


def test_finished_cache_is_reused_and_other_data_refused(lm_folder, tmp_path, monkeypatch):
    first = build_cache(lm_folder, TOKENS, tmp_path / "cache", batch_size=4, progress=False)
    monkeypatch.setattr("forethought.probes.cache.read_layers", lambda *a: pytest.fail("recomputed"))
    again = build_cache(lm_folder, TOKENS, tmp_path / "cache", batch_size=4, progress=False)
    assert again.meta == first.meta
    with pytest.raises(ForethoughtError, match="holds a cache of other tokens_hash"):
        build_cache(lm_folder, TOKENS[:, ::-1], tmp_path / "cache", progress=False)
    with pytest.raises(ForethoughtError, match="holds a cache of other layers"):
        build_cache(lm_folder, TOKENS, tmp_path / "cache", layers=[1], progress=False)


def test_interrupted_cache_resumes_to_the_same_files(lm_folder, tmp_path, monkeypatch):
    # in another folder: a finished cache of the same weights beside it would be linked, not computed
    straight = build_cache(lm_folder, TOKENS, tmp_path / "elsewhere" / "straight", batch_size=3, progress=False)
    real, calls = forethought.probes.cache.read_layers, {"n": 0}

    def crashes_on_third_chunk(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash
        return real(*args)

    monkeypatch.setattr("forethought.probes.cache.read_layers", crashes_on_third_chunk)
    with pytest.raises(Crash):
        build_cache(lm_folder, TOKENS, tmp_path / "resumed", batch_size=3, progress=False)
    with pytest.raises(ForethoughtError, match="holds an unfinished cache"):
        ResidualCache.open(tmp_path / "resumed")
    calls["n"] = -100  # no more crashes; count what the resume computes
    resumed = build_cache(lm_folder, TOKENS, tmp_path / "resumed", batch_size=3, progress=False)
    assert calls["n"] == -100 + 2  # chunks 3 and 4 only: the first two were kept
    for layer in straight.layers:
        np.testing.assert_array_equal(resumed.layer(layer), straight.layer(layer))
    assert not (tmp_path / "resumed.partial").exists()


def test_damaged_caches_are_named(lm_folder, tmp_path):
    build_cache(lm_folder, TOKENS, tmp_path / "cache", progress=False)
    with open(tmp_path / "cache" / "layer_02.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(ForethoughtError, match="layer_02.npy is missing, truncated or corrupt"):
        ResidualCache.open(tmp_path / "cache")
    shutil.copy(tmp_path / "cache" / "tokens.npy", tmp_path / "cache" / "layer_02.npy")
    with pytest.raises(
        ForethoughtError, match=r"layer_02.npy holds int64\[10, 7\], meta.json says float16\[10, 7, 16\]"
    ):
        ResidualCache.open(tmp_path / "cache")
    with pytest.raises(ForethoughtError, match="holds no cache"):
        ResidualCache.open(tmp_path / "nothing")


def test_too_little_disk_is_refused_before_writing(lm_folder, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="forethought.probes")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    with pytest.raises(ForethoughtError, match=r"caching needs about \d+ KiB in .*; only 1 KiB free"):
        build_cache(lm_folder, TOKENS, tmp_path / "cache", progress=False)
    assert "caching needs" in caplog.text  # said (logged) before starting
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()


def _overwrite(path, offset_from_end: int, data: bytes) -> None:
    """Write ``data`` into ``path`` at ``offset_from_end`` bytes before its end, keeping its size."""
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, 2)
        f.write(data)


@pytest.mark.parametrize("damage", ["nan bytes", "overwritten rows", "shifted tokens"])
def test_a_cache_changed_after_it_was_written_is_refused(lm_folder, tmp_path, damage):
    build_cache(lm_folder, TOKENS, tmp_path / "cache", progress=False)
    folder = tmp_path / "cache"
    if damage == "nan bytes":  # float16 NaNs (0x7e00) over the last 4 values of layer 1: same shape and type
        _overwrite(folder / "layer_01.npy", 8, np.full(4, np.nan, np.float16).tobytes())
    elif damage == "overwritten rows":  # the last 3 sequences of layer 3 replaced by another layer's
        row = 7 * 16 * 2
        _overwrite(folder / "layer_03.npy", 3 * row, np.load(folder / "layer_00.npy")[-3:].tobytes())
    else:  # every token moved one place along (np.roll), same shape and dtype
        np.save(folder / "tokens.npy", np.roll(np.load(folder / "tokens.npy"), 1))
    with pytest.raises(ForethoughtError, match=r"(changed or damaged after it was written|other tokens).*rebuild"):
        ResidualCache.open(folder).read(np.arange(10), [0, 1, 2, 3])  # tokens: on opening; layers: on reading
    with pytest.raises(ForethoughtError, match=r"changed or damaged|other tokens"):  # and when reused by a build
        build_cache(lm_folder, TOKENS, folder, progress=False).read(np.arange(10), [0, 1, 2, 3])


def test_reading_a_layer_checks_its_digest_once(lm_folder, tmp_path, monkeypatch):
    cache = build_cache(lm_folder, TOKENS, tmp_path / "cache", progress=False)
    checked = []
    monkeypatch.setattr("forethought.probes.cache.check_digest", lambda path, *args: checked.append(path.name))
    cache.read(np.arange(3), [0, 1])
    cache.read(np.arange(3, 6), [0, 1])
    assert checked == ["layer_00.npy", "layer_01.npy"]


def test_a_torn_meta_json_is_one_line(lm_folder, tmp_path):
    build_cache(lm_folder, TOKENS, tmp_path / "cache", progress=False)
    meta = tmp_path / "cache" / "meta.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ForethoughtError, match=r"meta.json is damaged .*rebuild the cache"):
        ResidualCache.open(tmp_path / "cache")
