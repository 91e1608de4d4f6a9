"""Future-token probes: planted signals recovered where planted and nowhere else; the lens starts as the
logit lens; bad τ named."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn.functional import cross_entropy

from forethought.core.errors import ForethoughtError
from forethought.models.lm import LMCheckpoint
from forethought.probes.future import (
    FittedProbes,
    FutureProbeConfig,
    InMemoryResiduals,
    ProbeScores,
    fit_future_probes,
)
from forethought.probes.residuals import StreamingResiduals, model_residuals
from forethought.probes.split import ProbeSplit, split_sequences, top_classes

VOCAB, SEQ, D = 12, 10, 16


def planted(n_sequences: int = 300, seed: int = 0) -> InMemoryResiduals:
    """Layer 0: noise. Layer 1: x[t+2] written in (τ = 2 decodable). Layer 2: x[t+1] written in (τ = 1)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(n_sequences, SEQ))
    codes = rng.normal(size=(VOCAB, D))

    def writes(offset: int) -> np.ndarray:
        ahead = np.zeros_like(tokens)
        ahead[:, : SEQ - offset] = tokens[:, offset:]
        return codes[ahead] + 0.3 * rng.normal(size=(n_sequences, SEQ, D))

    noise = rng.normal(size=(n_sequences, SEQ, D))
    return InMemoryResiduals(tokens, {0: noise, 1: writes(2), 2: writes(1)})


@pytest.mark.parametrize("kind", ["softmax", "topk"])
def test_planted_future_tokens_are_found_where_planted_and_nowhere_else(kind):
    config = FutureProbeConfig(kind=kind, top_k=VOCAB - 2, lr=3e-2, max_epochs=30, patience=3)
    fitted, scores = fit_future_probes(planted(), layers=[0, 1, 2], taus=[1, 2], config=config, vocab_size=VOCAB)
    table = scores.table()
    top1 = table[table["metric"] == "top1"].set_index(["layer", "tau"])["value"]
    found = {pair for pair, value in top1.items() if value > 0.8}
    assert found == {(1, 2), (2, 1)}, top1.to_dict()
    chance = 0.3 if kind == "topk" else 0.2  # topk pools two tokens into "other"
    assert top1.drop([(1, 2), (2, 1)]).max() < chance
    assert set(table["metric"]) == {"top1", "top5", "cross_entropy"} and (table["probe"] == kind).all()
    assert (table["ci_low"] <= table["value"]).all() and (table["value"] <= table["ci_high"]).all()
    assert len(fitted.history) >= 2


@pytest.mark.parametrize("kind", ["softmax", "topk"])
def test_a_fitted_probe_is_held_saved_and_read_back(kind, tmp_path):
    """A probe's weight and bias act on raw h; it predicts the planted tokens; its top directions span the planted
    subspace; the safetensors file round-trips, and damage or another origin is refused."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(300, SEQ))
    subspace = np.linalg.qr(rng.normal(size=(D, 4)))[0].T  # [4, D]: x[t+1] is written into these 4 directions only
    ahead = np.zeros_like(tokens)
    ahead[:, :-1] = tokens[:, 1:]
    h_all = 3 * rng.normal(size=(VOCAB, 4))[ahead] @ subspace + 0.3 * rng.normal(size=(300, SEQ, D)) + 5.0
    residuals = InMemoryResiduals(tokens, {1: h_all})
    config = FutureProbeConfig(kind=kind, top_k=VOCAB - 2, lr=3e-2, max_epochs=30, patience=3)
    fitted, _ = fit_future_probes(residuals, layers=[1], taus=[1, 2], config=config, vocab_size=VOCAB)
    probe = fitted.probe(1, 1)
    h = torch.from_numpy(h_all[:40]).float()  # [40, SEQ, D], raw (not standardised)
    logits = probe.predict(h)
    torch.testing.assert_close(h @ probe.weight + probe.bias, logits, atol=1e-3, rtol=1e-4)
    read_only = h_all[:40].copy()
    read_only.flags.writeable = False  # as a cache's memory map is: read without torch's non-writable warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(probe.predict(read_only), logits)
    truth = np.where(np.isin(ahead[:40], probe.classes), ahead[:40], -1)  # topk: a token outside the K is "other"
    assert (probe.classes[logits.argmax(-1).numpy()] == truth)[:, :-1].mean() > 0.8
    assert len(probe.classes) == logits.shape[-1] == (VOCAB - 1 if kind == "topk" else VOCAB)
    top = probe.directions(4)  # [4, D], orthonormal, mostly within the planted subspace (Adam leaves some noise)
    torch.testing.assert_close(top @ top.T, torch.eye(4), atol=1e-5, rtol=0)
    cosines = torch.linalg.svdvals(top.double() @ torch.from_numpy(subspace).T)  # principal angles' cosines
    assert cosines.max() > 0.9 and cosines.pow(2).mean() > 0.5  # a random 4-dim subspace of 16: ≈ 0.25
    fitted.save(tmp_path / "probes.safetensors", made_from="these residuals")
    back = FittedProbes.load(tmp_path / "probes.safetensors", made_from="these residuals")
    assert torch.equal(back.probe(1, 1).predict(h), logits) and (back.probe(1, 1).classes == probe.classes).all()
    assert back.history == fitted.history and back.layers == [1] and back.taus == [1, 2]
    with pytest.raises(ForethoughtError, match="made from other residuals"):
        FittedProbes.load(tmp_path / "probes.safetensors", made_from="others")
    data = bytearray((tmp_path / "probes.safetensors").read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the last tensor
    (tmp_path / "probes.safetensors").write_bytes(bytes(data))
    with pytest.raises(ForethoughtError, match="damaged"):
        FittedProbes.load(tmp_path / "probes.safetensors")
    with pytest.raises(ForethoughtError, match="no probe at layer 0, τ 1"):
        fitted.probe(0, 1)


def test_a_given_split_is_the_one_fitted_and_scored():
    """The split handed in decides the held-out examples and the classes; one that does not fit is refused."""
    residuals = planted(60)
    config = FutureProbeConfig(kind="topk", top_k=4, max_epochs=1)
    own = config.split(residuals.tokens)
    assert (own.classes == top_classes(residuals.tokens[own.train], 4)).all()
    assert np.intersect1d(own.train, own.test).size == 0 and set(own.validation) <= set(own.train)
    assert len(own.fit) + len(own.validation) == len(own.train)
    given = ProbeSplit(train=np.arange(40), validation=np.arange(5), test=np.arange(40, 60), classes=np.array([3, 1]))
    fitted, scores = fit_future_probes(residuals, [1], [1], replace(config, top_k=2), vocab_size=VOCAB, split=given)
    assert (np.unique(scores.sequence_ids) == np.arange(40, 60)).all() and (fitted.classes == [3, 1]).all()
    with pytest.raises(ForethoughtError, match="the split's classes do not fit softmax probes"):
        fit_future_probes(residuals, [1], [1], replace(config, kind="softmax"), vocab_size=VOCAB, split=given)
    with pytest.raises(ForethoughtError, match="the split names sequences beyond the 30 probed"):
        fit_future_probes(planted(30), [1], [1], config, vocab_size=VOCAB, split=given)


def test_untrained_lens_is_the_logit_lens(tiny_lm):
    tokens = torch.randint(0, 23, (40, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_lm.float()
    residuals = model_residuals(model, tokens).numpy()  # [L+1, n, seq, d]
    source = InMemoryResiduals(tokens.numpy(), {3: residuals[3]})
    config = FutureProbeConfig(kind="lens", max_epochs=0)  # no training: the identity
    _, scores = fit_future_probes(source, layers=[3], taus=[1], config=config, vocab_size=23,
                                  unembed=(model.transformer.ln_f, model.lm_head))
    table = scores.table()
    top1 = table[table["metric"] == "top1"].iloc[0]
    _, test = split_sequences(40, config.test_fraction, seed=config.seed)  # the probes' held-out sequences
    assert top1["n"] == len(test) * 7
    with torch.no_grad():
        predictions = model(tokens).logits[:, :-1].argmax(-1)  # the model's own next-token guesses
    own = (predictions[test] == tokens[test, 1:]).double().mean().item()
    assert top1["value"] == pytest.approx(own, abs=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # the lens froze copies, not the model it reads


def test_the_lens_in_topk_classes_is_the_logit_lens_mapped_by_hand(tiny_lm):
    """Beside topk probes the lens predicts their classes: the K most frequent training tokens, or "other" with
    the log-sum-exp of every other token's logit. Its hits and cross-entropy equal that mapping done by hand."""
    tokens = torch.randint(0, 23, (40, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_lm.float()
    source = InMemoryResiduals(tokens.numpy(), {3: model_residuals(model, tokens).numpy()[3]})
    config = FutureProbeConfig(kind="lens", max_epochs=0, top_k=5, in_topk_classes=True)
    _, scores = fit_future_probes(source, layers=[3], taus=[1], config=config, vocab_size=23,
                                  unembed=(model.transformer.ln_f, model.lm_head))
    train, test = split_sequences(40, config.test_fraction, seed=config.seed)
    classes = top_classes(tokens.numpy()[train], 5)
    with torch.no_grad():
        logits = model(tokens).logits[test, :-1].reshape(-1, 23).double()
    others = np.setdiff1d(np.arange(23), classes)
    mapped = torch.cat([logits[:, classes], logits[:, others].logsumexp(1, keepdim=True)], dim=1)
    lookup = np.full(23, 5)
    lookup[classes] = np.arange(5)
    target = torch.from_numpy(lookup[tokens.numpy()[test, 1:].reshape(-1)])
    hits, losses = scores.values[3, 1][:, 0], scores.values[3, 1][:, 2]
    np.testing.assert_array_equal(hits, (mapped.argmax(1) == target).numpy())
    np.testing.assert_allclose(losses, cross_entropy(mapped, target, reduction="none").numpy(), atol=1e-5)
    assert 0 < hits.mean() < 1


def test_massive_dimensions_do_not_hide_a_planted_signal():
    """A Llama-like residual stream: the signal on a scale of 1,000 and one "massive" noise dimension 100 times
    larger still. Standardised features recover it as well as from the clean stream."""
    clean = planted()
    massive = {layer: 1000 * array for layer, array in clean.arrays.items()}
    for array in massive.values():
        array[..., 0] = 1e5 * np.random.default_rng(5).normal(size=array.shape[:2])
    config = FutureProbeConfig(lr=3e-2, max_epochs=30, patience=3)
    tables = [fit_future_probes(source, layers=[1, 2], taus=[1, 2], config=config, vocab_size=VOCAB)[1].table()
              for source in (clean, InMemoryResiduals(clean.tokens, massive))]
    top1 = [table[table["metric"] == "top1"].set_index(["layer", "tau"])["value"] for table in tables]
    assert top1[1][(1, 2)] > 0.8 and top1[1][(2, 1)] > 0.8
    assert (top1[1] - top1[0]).abs().max() < 0.05


def test_untrained_probes_start_at_the_unigram_baseline():
    """W = 0 and the bias at the training targets' log-frequencies: the majority class, as the count baseline."""
    source = planted()
    tokens = source.tokens.copy()
    tokens[tokens > 8] = 3  # token 3 the majority: ~1/3 of the targets
    skewed = InMemoryResiduals(tokens, source.arrays)
    config = FutureProbeConfig(max_epochs=0)
    _, scores = fit_future_probes(skewed, layers=[1, 2], taus=[1, 2], config=config, vocab_size=VOCAB)
    _, test = split_sequences(len(tokens), config.test_fraction, seed=config.seed)
    majority = (tokens[test, 1:SEQ - 1] == 3).mean()  # τ = 1 targets of the probed positions t < T − 2
    top1 = scores.table().query("metric == 'top1' and tau == 1")["value"]
    np.testing.assert_allclose(top1, majority, atol=1e-12)


def test_bfloat16_probes_agree_with_float32():
    config = FutureProbeConfig(lr=3e-2, max_epochs=30, patience=3)
    tables = [fit_future_probes(planted(), layers=[1, 2], taus=[1, 2], config=replace(config, precision=precision),
                                vocab_size=VOCAB)[1].table() for precision in ("float32", "bfloat16")]
    top1 = [table[table["metric"] == "top1"]["value"].to_numpy() for table in tables]
    np.testing.assert_allclose(top1[1], top1[0], atol=0.03)
    with pytest.raises(ForethoughtError, match="unknown precision 'half'; choose one of float32, bfloat16"):
        FutureProbeConfig(precision="half")


def test_bad_tau_is_named():
    with pytest.raises(ForethoughtError, match=r"τ must lie in 1 … 9 for sequences of 10 tokens, got \[0, 1\]"):
        fit_future_probes(planted(20), layers=[1], taus=[0, 1], config=FutureProbeConfig(), vocab_size=VOCAB)
    with pytest.raises(ForethoughtError, match="unknown probe kind 'quadratic'"):
        FutureProbeConfig(kind="quadratic")


def test_paired_difference_finds_what_one_model_lacks():
    """P = acc(with) − acc(without): large with an interval above 0 where only one holds the signal, ≈ 0 elsewhere."""
    full = planted()
    lacking = InMemoryResiduals(full.tokens, {**full.arrays, 1: planted(seed=1).arrays[0]})  # layer 1: noise
    config = FutureProbeConfig(lr=3e-2, max_epochs=30, patience=3)
    _, with_signal = fit_future_probes(full, layers=[1, 2], taus=[1, 2], config=config, vocab_size=VOCAB)
    _, without = fit_future_probes(lacking, layers=[1, 2], taus=[1, 2], config=config, vocab_size=VOCAB)
    difference = with_signal.minus(without)
    top1 = difference[difference["metric"] == "top1"].set_index(["layer", "tau"])
    assert top1.loc[(1, 2), "value"] > 0.8 and top1.loc[(1, 2), "ci_low"] > 0.7
    assert top1.loc[(2, 1), "value"] == 0.0 and top1.loc[(2, 1), "ci_low"] == top1.loc[(2, 1), "ci_high"] == 0.0
    assert top1.loc[(1, 1), "ci_low"] <= 0 <= top1.loc[(1, 1), "ci_high"]  # neither holds x[t+1] at layer 1
    with pytest.raises(ForethoughtError, match="same examples"):
        with_signal.minus(fit_future_probes(full, layers=[1], taus=[1], config=config, vocab_size=VOCAB)[1])


def test_streaming_from_the_model_fits_what_the_arrays_fit(lm_folder):
    """No disk cache: residuals recomputed by forward passes give the probes exactly the in-memory arrays'."""
    tokens = np.random.default_rng(2).integers(0, 23, size=(30, 8))
    model = LMCheckpoint.load(lm_folder).model
    streaming = StreamingResiduals(model, tokens)
    arrays = model_residuals(model, torch.from_numpy(tokens), [1, 3]).numpy()
    in_memory = InMemoryResiduals(tokens, {1: arrays[0], 3: arrays[1]})
    np.testing.assert_array_equal(streaming.read(np.array([2, 5]), [1, 3]), in_memory.read(np.array([2, 5]), [1, 3]))
    config = FutureProbeConfig(max_epochs=3, batch_sequences=8)
    _, streamed = fit_future_probes(streaming, layers=[1, 3], taus=[1, 2], config=config, vocab_size=23)
    _, held = fit_future_probes(in_memory, layers=[1, 3], taus=[1, 2], config=config, vocab_size=23)
    pd.testing.assert_frame_equal(streamed.table(), held.table())


def test_the_split_keeps_each_cluster_on_one_side_and_is_the_old_split_without_clusters():
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(200, SEQ))
    clusters = np.repeat(np.arange(40), 5)[np.random.default_rng(1).permutation(200)]  # 40 documents, 5 windows each
    split = ProbeSplit.of(tokens, 0.25, 0.2, seed=3, clusters=clusters)
    parts = [set(clusters[split.fit]), set(clusters[split.validation]), set(clusters[split.test])]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[2]) == 10 and len(split.train) + len(split.test) == 200
    plain = ProbeSplit.of(tokens, 0.25, 0.2, seed=3)  # every sequence its own cluster: sequence-level, as before
    train, test = split_sequences(200, 0.25, seed=3)
    assert np.array_equal(plain.train, train) and np.array_equal(plain.test, test)
    assert np.array_equal(plain.validation, np.sort(np.random.default_rng(3).permutation(train)[:30]))
    with pytest.raises(ForethoughtError, match="3 held-out documents .* too few"):
        ProbeSplit.of(tokens[:3], 0.9, 0.2, seed=0, clusters=np.arange(3))


def test_scores_resample_clusters_and_report_each_text():
    rng = np.random.default_rng(0)
    sequence_ids = np.repeat(np.arange(60), 4)
    hits = rng.random(240) < np.where(sequence_ids < 30, 0.9, 0.3)  # text "a" (sequences 0–29) is easy, "b" hard
    values = np.stack([hits, hits, -np.log(np.where(hits, 0.9, 0.1))], axis=1).astype(float)
    scores = ProbeScores("softmax", {(0, 1): values}, sequence_ids)
    texts, clusters = np.array(["a"] * 30 + ["b"] * 30, dtype=object), np.arange(60) // 10  # 6 documents
    clustered = scores.on(clusters, texts)
    table = pd.concat([clustered.table(), clustered.table(by_text=True)]).set_index(["split", "metric"])
    assert list(dict.fromkeys(table.index.get_level_values("split"))) == ["test", "test: a", "test: b"]
    assert table.loc[("test: a", "top1"), "value"] == pytest.approx(hits[:120].mean())
    assert table.loc[("test: b", "top1"), "value"] == pytest.approx(hits[120:].mean())
    assert table.loc[("test", "top1"), "value"] == pytest.approx(hits.mean())
    plain = scores.table().set_index("metric")  # resampling 60 sequences, not 6 documents: a narrower interval
    pooled = table.loc["test"]
    assert (plain.loc["top1", "ci_high"] - plain.loc["top1", "ci_low"]
            < pooled.loc["top1", "ci_high"] - pooled.loc["top1", "ci_low"])
    difference = clustered.minus(clustered, by_text=True)
    assert (difference["value"] == 0).all() and set(difference["split"]) == {"test: a", "test: b"}
    assert scores.on(clusters, np.full(60, "a", dtype=object)).table(by_text=True).empty  # one text: no rows


def test_an_mlp_probe_reads_what_no_linear_probe_can(tmp_path):
    """x[t+1]'s class is the sign of a product of two residual coordinates (an XOR of their signs): invisible to a
    linear probe (at chance), read by one hidden layer. The mlp probe is held, saved and read back like the others."""
    rng = np.random.default_rng(0)
    n, seq = 400, SEQ
    residual = rng.normal(size=(n, seq, D))
    tokens = np.zeros((n, seq), dtype=np.int64)
    tokens[:, 1:] = (residual[:, :-1, 0] * residual[:, :-1, 1] > 0).astype(np.int64)  # x[t+1] = [h0·h1 > 0]
    residuals = InMemoryResiduals(tokens, {0: residual})
    common = dict(top_k=2, lr=1e-2, max_epochs=40, patience=5, hidden=32)
    scores = {kind: fit_future_probes(residuals, [0], [1], FutureProbeConfig(kind=kind, **common), vocab_size=2)
              for kind in ("topk", "mlp")}
    top1 = {kind: scored.table().set_index("metric").loc["top1", "value"] for kind, (_, scored) in scores.items()}
    assert top1["topk"] < 0.6 and top1["mlp"] > 0.85, top1
    fitted = scores["mlp"][0]
    with pytest.raises(ForethoughtError, match="not affine"):
        _ = fitted.probe(0, 1).weight
    h = torch.from_numpy(residual[:5, 3]).float()
    assert fitted.probe(0, 1).predict(h).shape == (5, 3)  # the two tokens + "other"
    fitted.save(tmp_path / "mlp.safetensors", "here")
    again = FittedProbes.load(tmp_path / "mlp.safetensors", "here")
    assert torch.equal(again.probe(0, 1).predict(h), fitted.probe(0, 1).predict(h))
