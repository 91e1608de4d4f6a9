"""The offline GPT-2 tokenizer, path-star text through it, corpora and resumable token files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.models.tasks.pathstar import IGNORE, PathStarData
from forethought.models.tasks.text import (
    TextData,
    TextTask,
    TokenFile,
    check_vocabulary,
    gpt2_tokenizer,
    iter_documents,
    source_fingerprint,
    tokenize_source,
    tokenizer_fingerprint,
)

PAPER_LINE = "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=32,34,6,16,12"


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_gpt2_ids(tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Hello world") == [15496, 995]


def test_the_offline_tokenizer_folder_is_made_once_and_a_damaged_one_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FORETHOUGHT_CACHE", str(tmp_path))
    gpt2_tokenizer()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-tokenizer", "gpt2-tokenizer.lock"]  # no staging left
    made = tmp_path / "gpt2-tokenizer" / "tokenizer.json"
    stamp = made.stat().st_mtime_ns
    gpt2_tokenizer()
    assert made.stat().st_mtime_ns == stamp  # reused, not made per call
    made.write_text('{"model": ')  # damaged
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]
    assert json.loads(made.read_text())["model"]["type"] == "BPE"  # made again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-tokenizer", "gpt2-tokenizer.lock"]


def test_pathstar_text_through_bpe(tokenizer):
    data = PathStarData.from_lines([PAPER_LINE, PAPER_LINE], n_nodes=50)
    inputs, labels = data.sequences("teacher-forcing", tokenizer=tokenizer)
    prefix_len = len(tokenizer.encode(PAPER_LINE.split("=")[0] + "="))
    assert tokenizer.decode(inputs[0, :prefix_len]) == PAPER_LINE.split("=")[0] + "="
    assert tokenizer.decode(labels[0, prefix_len - 1:]) == "32,34,6,16,12"
    assert (labels[0, : prefix_len - 1] == IGNORE).all()
    inputs, _ = data.sequences("teacherless", tokenizer=tokenizer)
    assert set(inputs[0, prefix_len:].tolist()) == {tokenizer.encode("$")[0]}
    _, labels = data.sequences("reverse", tokenizer=tokenizer)
    assert tokenizer.decode(labels[0, prefix_len - 1:]) == "12,16,6,34,32"


def test_unequal_bpe_lengths_are_refused(tokenizer):
    data = PathStarData.from_lines(["1,2|1,3/1,2=1,2", "1,2|1,38291/1,2=1,2"])  # 38291: several BPE tokens
    with pytest.raises(ForethoughtError, match="splits the prefix of sample 2 into"):
        data.sequences("teacher-forcing", tokenizer=tokenizer)


# corpora and token files ---------------------------------------------------------------------------------

DOCS = ["the cat sat on the mat", "a dog", "one two three four five six seven eight nine ten eleven twelve"]


def test_local_sources_in_three_formats(tmp_path):
    (tmp_path / "a.txt").write_text(f"{DOCS[0]}\n\n{DOCS[1]}\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in DOCS) + "\n")
    pd.DataFrame({"body": DOCS}).to_parquet(tmp_path / "c.parquet")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == DOCS[:2]
    assert list(iter_documents(str(tmp_path / "b.jsonl"), text_field="body")) == DOCS
    assert list(iter_documents(str(tmp_path / "c.parquet"), text_field="body")) == DOCS
    with pytest.raises(ForethoughtError, match="b.jsonl line 1: no JSON object with 'text'"):
        list(iter_documents(str(tmp_path / "b.jsonl")))


def test_hugging_face_loading_path_on_a_local_dataset_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    assert list(iter_documents(f"hf:{tmp_path / 'data'}")) == DOCS
    with pytest.raises(ForethoughtError, match="hf:nobody/nothing: not a local dataset folder, and the .* hub cannot"):
        next(iter_documents("hf:nobody/nothing"))  # the tests run with HF_HUB_OFFLINE=1


def test_token_file_round_trip_layouts_and_reuse(tokenizer, tmp_path):
    tokens = tokenize_source(str(_jsonl(tmp_path)), tmp_path / "tok", tokenizer)
    assert tokens.n_documents == 3 and tokens.meta["vocab_size"] == 50257
    for index, doc in enumerate(DOCS):
        start, end = tokens.offsets[index], tokens.offsets[index + 1]
        assert tokenizer.decode(tokens.tokens[start:end].tolist()) == doc
    first = tokens.sequences(5)
    assert first.shape == (2, 5)  # "a dog" is shorter than 5 tokens
    packed = tokens.sequences(4, layout="packed", separator=50256)
    assert packed.shape == (int(tokens.offsets[-1] + 3) // 4, 4)
    with pytest.raises(ForethoughtError, match="no document has 64 tokens"):
        tokens.sequences(64)
    description = {"source": str(_jsonl(tmp_path)), "split": "train", "text_field": "text", "max_documents": None}
    again = TokenFile.build(_explode(), tmp_path / "tok", tokenizer, description)  # reused: not read
    assert np.array_equal(again.tokens, tokens.tokens)
    with pytest.raises(ForethoughtError, match="holds tokens of other data"):
        tokenize_source(str(_jsonl(tmp_path)), tmp_path / "tok", tokenizer, max_documents=2)


def test_interrupted_tokenisation_resumes_to_the_same_file(tokenizer, tmp_path):
    docs = [f"document number {i} " + "word " * (i % 7) for i in range(50)]
    description = {"source": "test"}
    straight = TokenFile.build(iter(docs), tmp_path / "straight", tokenizer, description, chunk_documents=8)

    def dies_after(n):
        yield from docs[:n]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        TokenFile.build(dies_after(21), tmp_path / "resumed", tokenizer, description, chunk_documents=8)
    with pytest.raises(ForethoughtError, match="unfinished tokenisation"):
        TokenFile.open(tmp_path / "resumed")
    resumed = TokenFile.build(iter(docs), tmp_path / "resumed", tokenizer, description, chunk_documents=8)
    assert np.array_equal(resumed.tokens, straight.tokens)
    assert np.array_equal(resumed.offsets, straight.offsets)


def test_truncated_token_file_is_detected(tokenizer, tmp_path):
    tokens = tokenize_source(str(_jsonl(tmp_path)), tmp_path / "tok", tokenizer)
    with open(tokens.folder / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ForethoughtError, match="tokens.bin is truncated"):
        TokenFile.open(tmp_path / "tok")


def test_document_split_is_disjoint_and_seeded(tokenizer, tmp_path):
    docs = [f"doc {i}" for i in range(100)]
    tokens = TokenFile.build(iter(docs), tmp_path / "t", tokenizer, {"source": "x"})
    train, val, test = tokens.split_documents((0.8, 0.1, 0.1), seed=1)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert not (set(train) & set(test)) and not (set(train) & set(val))
    assert np.array_equal(tokens.split_documents((0.8, 0.1, 0.1), seed=1)[2], test)


def _jsonl(folder):
    path = folder / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    return path


def _explode():
    raise AssertionError("a finished token folder must not read its documents again")
    yield


def test_too_little_disk_is_refused_before_starting(tokenizer, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 100, 10))
    with pytest.raises(ForethoughtError, match=r"needs about \d+ KiB in .*only 0 KiB free"):
        tokenize_source(str(_jsonl(tmp_path)), tmp_path / "tok", tokenizer)
    with pytest.raises(ForethoughtError, match=r"tokenising hf:.* needs about"):  # a local dataset folder
        tokenize_source(f"hf:{tmp_path}", tmp_path / "tok", tokenizer)
    assert not (tmp_path / "tok").exists()


def test_token_file_keeps_its_identity_across_tokenizer_copies(tokenizer, tmp_path):
    first = tokenize_source(str(_jsonl(tmp_path)), tmp_path / "tok", tokenizer)
    assert first.meta["tokenizer"] == tokenizer_fingerprint(tokenizer) == "gpt2"
    again = tokenize_source(str(_jsonl(tmp_path)), tmp_path / "tok", gpt2_tokenizer())  # another load
    assert np.array_equal(again.tokens, first.tokens)


def test_text_data_splits_by_document_and_reloads_identically(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [f"story {i}: " + " ".join(f"w{i}x{j}" for j in range(12 + i % 5)) for i in range(60)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    data = TextData(corpus=str(path), seq_len=16, split_fractions=(0.6, 0.2, 0.2))
    parts = data.load(tokenizer, tmp_path / "tokens")
    assert {name: len(part) for name, part in parts.items()} == {"train": 36, "validation": 12, "test": 12}
    rows = {name: {tuple(row) for row in part.tolist()} for name, part in parts.items()}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["validation"]
    again = data.load(tokenizer, tmp_path / "tokens")
    assert all(np.array_equal(again[name], parts[name]) for name in parts)
    with pytest.raises(ForethoughtError, match="the train split of .* gives no sequence: no document has 500 tokens"):
        TextData(corpus=str(path), seq_len=500).load(tokenizer, tmp_path / "tokens")
    with pytest.raises(ForethoughtError, match="unknown layout 'ragged'"):
        TextData(layout="ragged")


def test_text_task_walks_epochs_without_replacement_and_resumes():
    sequences = np.arange(10 * 4).reshape(10, 4)
    task, generator = TextTask(sequences, seed=3), torch.Generator()
    first_epoch = torch.cat([task.sample(4, generator)[0] for _ in range(2)] + [task.sample(2, generator)[0]])
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 40, 4))  # every sequence once
    state = task.state_dict()
    following = task.sample(7, generator)[0]
    resumed = TextTask(sequences, seed=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample(7, generator)[0], following)
    assert not torch.equal(TextTask(sequences, seed=4).sample(10, generator)[0], first_epoch)


def test_text_task_loss_is_next_token_cross_entropy(tiny_lm):
    tokens = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = tiny_lm(tokens).logits
    by_hand = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(TextTask(tokens.numpy()).loss(tiny_lm, tokens, tokens), by_hand, atol=1e-12, rtol=0)


def test_vocabulary_mismatch_is_refused(tokenizer):
    with pytest.raises(ForethoughtError, match="the tokenizer has 50257 tokens but tiny has a vocabulary of 23"):
        check_vocabulary(tokenizer, 23, "tiny")


def test_a_changed_corpus_gets_a_new_token_folder(tokenizer, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} about a cat" for i in range(100)))
    data = TextData(corpus=str(corpus), seq_len=2)
    before = data.tokens_folder(tokenizer, tmp_path / "tokens")
    data.load(tokenizer, tmp_path / "tokens")
    corpus.write_text(corpus.read_text().replace("a", "e"))  # same path, same size, other text
    after = data.tokens_folder(tokenizer, tmp_path / "tokens")
    assert after != before
    assert TokenFile.open(before).meta["content"] != source_fingerprint(str(corpus))


@pytest.mark.parametrize("file", ["tokens.bin", "offsets.npy"])
def test_a_token_file_changed_after_it_was_written_is_refused(tokenizer, tmp_path, file):
    tokens = tokenize_source(str(_jsonl(tmp_path)), tmp_path / "tok", tokenizer)
    path = tokens.folder / file
    data = bytearray(path.read_bytes())
    data[-2:] = data[-1:] + data[-2:-1] if data[-1] != data[-2] else bytes([data[-1] ^ 1, data[-2]])
    path.write_bytes(bytes(data))  # same size: only the digest can tell
    with pytest.raises(ForethoughtError, match=rf"{file} was changed or damaged .*tokenise afresh"):
        TokenFile.open(tmp_path / "tok")


def test_a_document_that_is_not_text_is_named(tokenizer, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": 12}\n')
    with pytest.raises(ForethoughtError, match=r"document 2 is int, not text"):
        tokenize_source(str(corpus), tmp_path / "tok", tokenizer)
