"""A tiny vanilla/myopic pair of text models (and their multi-token sibling), trained once per test session."""

from __future__ import annotations

import pytest

from forethought.models.lm import LMTrainConfig, train_lm

TWIN_SETTINGS = dict(corpus="embedded", max_documents=3000, model="gpt2-micro", seq_len=32, steps=40, batch_size=16,
                     lr=5e-3, eval_every=20, eval_batches=1, checkpoint_every=10, keep_checkpoints=4, progress=False)


@pytest.fixture(scope="session")
def twins(tmp_path_factory):
    """A vanilla/myopic pair of gpt2-micro models trained briefly on a slice of the embedded corpus (checkpoints of
    steps 10, 20, 30, 40 kept: the loss-matched estimate has several to choose from)."""
    root = tmp_path_factory.mktemp("twins")
    for name in ("vanilla", "myopic"):
        train_lm(LMTrainConfig.from_settings(**TWIN_SETTINGS, tokens_root=str(root / "tokens"),
                                             myopic=name == "myopic", out=str(root / name)))
    return root


@pytest.fixture(scope="session")
def mtp_twin(twins):
    """The twins' multi-token sibling (objective mtp:2, otherwise the same settings), in the twins' folder."""
    train_lm(LMTrainConfig.from_settings(**TWIN_SETTINGS, tokens_root=str(twins / "tokens"), objective="mtp:2",
                                         out=str(twins / "mtp")))
    return twins / "mtp"
