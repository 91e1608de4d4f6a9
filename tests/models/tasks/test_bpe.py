"""The corpus BPE: fitted on the training documents only, exact size, reused, round trips, loaded like any tokenizer."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from forethought.core.errors import ForethoughtError
from forethought.models.lm import LMCheckpoint, LMTrainConfig, train_lm
from forethought.models.tasks.bpe import bpe_folder, bpe_size, corpus_bpe
from forethought.models.tasks.text import TextData, split_documents, tokenizer_fingerprint
from forethought.probes.cache import build_cache

PLANTED = "qzxvjqzxvj"


def _corpus(tmp_path, planted_in: str, n_documents: int = 200):
    """A .txt corpus of ``n_documents`` paragraphs; the documents of split ``planted_in`` repeat PLANTED."""
    train, _, test = split_documents(n_documents, (0.9, 0.01, 0.09), seed=0)
    chosen = set((train if planted_in == "train" else test).tolist())
    words = "the cat sat on a mat while dogs ran past the old house by the river".split()
    documents = [" ".join(words[(i + j) % len(words)] for j in range(40)) + (f" {PLANTED}" * 20 if i in chosen else "")
                 for i in range(n_documents)]
    path = tmp_path / f"corpus-{planted_in}.txt"
    path.write_text("\n\n".join(documents) + "\n")
    return TextData(corpus=str(path), layout="packed", seq_len=16)


@pytest.mark.parametrize("planted_in, merged", [("test", False), ("train", True)])
def test_only_training_documents_shape_the_vocabulary(tmp_path, planted_in, merged):
    tokenizer = corpus_bpe(_corpus(tmp_path, planted_in), 300, tmp_path / "tokens")
    pieces = tokenizer.tokenize(" " + PLANTED)
    assert (len(pieces) == 1) == merged, pieces


def test_the_bpe_has_its_size_round_trips_and_is_reused(tmp_path):
    data = _corpus(tmp_path, "train")
    tokenizer = corpus_bpe(data, 300, tmp_path / "tokens")
    assert len(tokenizer) == 300 and tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    text = "Naïve café — 東京, emoji 🙂 and\ttabs\nnew lines"  # bytes never seen in training still round-trip
    assert tokenizer.decode(tokenizer.encode(text)) == text
    folder = bpe_folder(data, 300, tmp_path / "tokens")
    assert json.loads((folder / "forethought-bpe.json").read_text())["n_documents"] == 180
    again = corpus_bpe(data, 300, tmp_path / "tokens")  # loaded from the folder
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(folder))) == tokenizer_fingerprint(tokenizer)


def test_bad_sizes_and_corpora_too_small_are_one_line_errors(tmp_path):
    assert bpe_size("bpe") == 4096 and bpe_size("bpe:512") == 512 and bpe_size("gpt2") is None
    for bad in ("bpe:12", "bpe:70000", "bpe:many"):
        with pytest.raises(ForethoughtError, match="the BPE size must be an integer from 257 to 65536"):
            bpe_size(bad)
    with pytest.raises(ForethoughtError, match="give a BPE of only .* tokens; ask for `tokenizer` bpe:"):
        corpus_bpe(_corpus(tmp_path, "train"), 60000, tmp_path / "tokens")
    with pytest.raises(ForethoughtError, match="cannot fine-tune a pretrained model"):
        LMTrainConfig(model="some/folder", from_pretrained=True, tokenizer="bpe:512")


def test_a_run_with_a_corpus_bpe_saves_it_in_every_checkpoint(tmp_path):
    data = _corpus(tmp_path, "train")
    config = LMTrainConfig.from_settings(
        corpus=data.corpus, layout="packed", seq_len=16, model="gpt2-micro", tokenizer="bpe:300", steps=2,
        batch_size=4, eval_every=1, checkpoint_every=1, progress=False, tokens_root=str(tmp_path / "tokens"),
        out=str(tmp_path / "run"))
    result = train_lm(config)
    checkpoint = LMCheckpoint.load(tmp_path / "run")
    fitted = corpus_bpe(data, 300, tmp_path / "tokens")
    assert tokenizer_fingerprint(checkpoint.tokenizer) == tokenizer_fingerprint(fitted)
    assert checkpoint.model.config.vocab_size == 300 and (result.checkpoint / "tokenizer.json").is_file()
    tokens_meta = json.loads(next((tmp_path / "tokens").glob("corpus-train-*/meta.json")).read_text())
    assert tokens_meta["tokenizer"] == tokenizer_fingerprint(fitted)  # the token file names its tokenizer
    test = checkpoint.data().load(checkpoint.tokenizer, tmp_path / "tokens")["test"][:2]
    cache = build_cache(checkpoint.source, test, tmp_path / "cache")  # TransformerLens boots the folder as it is
    with torch.no_grad():
        hidden = checkpoint.model(torch.from_numpy(test), output_hidden_states=True).hidden_states
    torch.testing.assert_close(torch.from_numpy(np.asarray(cache.layer(1), dtype=np.float32)), hidden[1],
                               atol=2e-3, rtol=2e-3)  # float16 cache
