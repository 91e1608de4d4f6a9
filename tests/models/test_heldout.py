"""Held-out evaluation: the sample of test documents, its clusters, and per-token losses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from forethought.models.heldout import heldout_sample, sample_documents, token_losses
from forethought.models.tasks.text import TextTask, TokenFile


def test_token_losses_are_the_training_loss(tiny_lm):
    tokens = torch.randint(0, 23, (5, 9), generator=torch.Generator().manual_seed(4))
    losses = token_losses(tiny_lm, tokens, batch_size=2)
    assert losses.shape == (5, 8)
    assert losses.mean() == pytest.approx(TextTask(tokens.numpy()).loss(tiny_lm, tokens, tokens).item(), rel=1e-6)


def _token_file(lengths: list[int]) -> TokenFile:
    """Documents whose every token is the document's index (so a window shows which documents it holds)."""
    tokens = np.concatenate([np.full(n, i, dtype=np.uint16) for i, n in enumerate(lengths)])
    return TokenFile(Path("."), tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), {})


@pytest.mark.parametrize("layout", ["first", "packed"])
def test_no_document_is_in_two_clusters(layout):
    lengths = np.random.default_rng(0).integers(3, 40, size=200).tolist()
    file = _token_file(lengths)
    sequences, clusters = file.document_sequences(8, layout, np.arange(0, 200, 2), separator=None,
                                                  block_sequences=3)
    documents_of = {}
    for window, cluster in zip(sequences, clusters):
        documents_of.setdefault(int(cluster), set()).update(window.tolist())
    every = [document for held in documents_of.values() for document in held]
    assert len(every) == len(set(every))  # no document in two clusters
    assert set(every) <= set(range(0, 200, 2))  # only the documents asked for
    if layout == "first":  # a long-enough document's first tokens, its own cluster
        assert all(held == {cluster} for cluster, held in documents_of.items())
        assert len(sequences) == sum(lengths[d] >= 8 for d in range(0, 200, 2))
    else:  # packed blocks of ~3 windows: almost every token of the documents is kept
        assert len(sequences) * 8 > 0.8 * sum(lengths[d] for d in range(0, 200, 2))
        assert len(np.unique(clusters)) > len(sequences) / 5


def test_sample_is_stratified_by_text_seeded_and_whole_when_asked():
    lengths = np.random.default_rng(1).integers(5, 60, size=300).tolist()
    file, documents = _token_file(lengths), np.arange(300)
    texts = np.array(["a"] * 200 + ["b"] * 60 + ["c"] * 40, dtype=object)  # the first 100 documents: all "a"
    every, _, every_texts = sample_documents(file, documents, texts, 16, "packed", None, None, seed=0)
    sequences, clusters, names = sample_documents(file, documents, texts, 16, "packed", None, 100, seed=0)
    assert len(sequences) == 100
    for text in "abc":  # each text's share of the sample is its share of everything the documents give
        assert abs((names == text).sum() - 100 * (every_texts == text).mean()) <= 1
        assert set(np.unique(sequences[names == text])) <= set(documents[texts == text])
    again = sample_documents(file, documents, texts, 16, "packed", None, 100, seed=0)
    other = sample_documents(file, documents, texts, 16, "packed", None, 100, seed=1)
    assert np.array_equal(again[0], sequences) and np.array_equal(again[1], clusters)
    assert not np.array_equal(other[0], sequences)
    assert len(every) == sum(len(file.document_sequences(16, "packed", documents[texts == t], None, 4)[0])
                             for t in "abc")


def test_heldout_sample_draws_across_the_test_documents(tmp_path):
    from forethought.models.tasks.text import TextData, gpt2_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"text": "{i} {" ".join(["word"] * (20 + i % 7))}"}}\n' for i in range(400)))
    data = TextData(corpus=str(corpus), layout="first", seq_len=16)
    tokenizer = gpt2_tokenizer()
    sample = heldout_sample(data, tokenizer, tmp_path / "tokens", 10, seed=0)
    test = data.load(tokenizer, tmp_path / "tokens")["test"]
    assert len(sample) == 10 and sample.composition()["by_text"] == {str(corpus): {"sequences": 10, "clusters": 10}}
    rows = {tuple(row) for row in test.tolist()}
    assert all(tuple(row) in rows for row in sample.tokens.tolist())  # test documents only
    assert sample.tokens.tolist() != test[:10].tolist()  # a sample, not the first ten
    assert len(heldout_sample(data, tokenizer, tmp_path / "tokens", None, seed=0)) == len(test)
