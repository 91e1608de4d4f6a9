"""The offline GPT-2 tokenizer gives GPT-2's ids, and path-star text goes through it."""

from __future__ import annotations

import pytest

from models.errors import ForethoughtError
from models.tasks.pathstar import IGNORE, PathStarData
from models.tasks.text import gpt2_tokenizer

PAPER_LINE = "32,3|16,12|3,19|32,34|34,6|6,16|19,47|47,28/32,12=32,34,6,16,12"


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def test_gpt2_ids(tokenizer):
    assert len(tokenizer) == 50257
    assert tokenizer.encode("Hello world") == [15496, 995]


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
