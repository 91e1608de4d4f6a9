"""Multi-token prediction: mtp:1 is next-token training bit for bit, head k is scored on x[t+k] in every family,
a head learns a relation only it is trained on, and the extra heads are saved beside an ordinary causal LM and
resumed exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.core.files import DIGESTS_FILE
from forethought.models.checkpoint import list_checkpoints
from forethought.models.gpt2 import build_lm, gpt2_config
from forethought.models.lm import LMCheckpoint, LMTrainConfig, train_lm
from forethought.models.mtp import HEADS_FILE, MultiTokenTask, add_heads, extra_heads, head_losses, objective_heads
from forethought.models.tasks.text import next_token_loss
from forethought.models.train import TrainConfig, train
from tests.conftest import tiny_family
from tests.models.test_lm import interrupted_at_step_four, settings


def test_mtp_1_is_next_token_training_bit_for_bit(corpus, tmp_path):
    plain = train_lm(settings(corpus, tmp_path, out=str(tmp_path / "plain")))
    one = train_lm(settings(corpus, tmp_path, objective="mtp:1", out=str(tmp_path / "one")))
    assert extra_heads(one.model) is None and one.history == plain.history
    for (name, a), b in zip(plain.model.state_dict().items(), one.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_head_k_is_scored_on_the_token_k_ahead(family):
    """At the start every extra head is a copy of the last block, so its logits are the model's own: head k's loss
    must be the model's logits at t scored against x[t+k] — the trunk's arguments (masks, rotary tables) reach the
    heads as they reach the last block."""
    model = (build_lm(gpt2_config(n_layer=2, d_model=16, n_head=2, vocab_size=23), seed=0).double().eval()
             if family == "gpt2" else tiny_family(family))
    add_heads(model, 4)
    tokens = torch.randint(0, 23, (3, 12), generator=torch.Generator().manual_seed(1))
    logits = model(tokens, use_cache=False).logits
    losses = head_losses(model, model, tokens, tokens)
    assert len(losses) == 4
    for k, loss in enumerate(losses, start=1):
        torch.testing.assert_close(loss, next_token_loss(logits, tokens, offset=k), rtol=0, atol=1e-12)
    with torch.no_grad():  # change head 3: only the loss at t + 3 moves
        for parameter in extra_heads(model)[1].parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    moved = head_losses(model, model, tokens, tokens)
    assert [bool(a != b) for a, b in zip(losses, moved)] == [False, False, True, False]


def planted(n: int, seed: int) -> np.ndarray:
    """Sequences [n, 16] over 16 tokens, uniform except x[t+2] = (x[t] + 1) mod 16 at every t ≡ 0 (mod 4)."""
    sequences = np.random.default_rng(seed).integers(0, 16, (n, 16))
    sequences[:, 2::4] = (sequences[:, 0::4] + 1) % 16  # targets 2, 6, 10, 14 from sources 0, 4, 8, 12
    return sequences


def test_a_head_learns_the_relation_only_it_is_trained_on(tmp_path):
    """At t ≡ 0 (mod 4) nothing predicts x[t+1] (uniform), so head 1 stays at log 16 there, while head 2 — the
    only head asked for x[t+2] from position t — learns it from x[t]."""
    model = build_lm(gpt2_config(n_layer=2, d_model=64, n_head=2, vocab_size=16), seed=0)
    add_heads(model, 2)
    train(model, MultiTokenTask(planted(8192, 0), model, seed=0),
          TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup_frac=0.05, eval_every=300, checkpoint_every=300,
                      device="cpu", progress=False), tmp_path / "run")
    tokens = torch.from_numpy(planted(256, 1))
    with torch.no_grad():
        head_1, head_2 = head_losses(model.eval(), model, tokens, tokens, reduction="none")
    assert float(head_1[:, 0::4].mean()) > 0.95 * np.log(16)  # x[t+1] at t ≡ 0: uniform, unpredictable
    assert float(head_2[:, 0::4].mean()) < 0.2 * np.log(16)  # x[t+2] at t ≡ 0: learned by head 2
    assert float(head_2[:, 1::4].mean()) > 0.95 * np.log(16)  # x[t+2] at t ≡ 1: uniform again


LOOKAHEAD_VOCAB = 128
PERMUTATION = np.random.default_rng(123).permutation(LOOKAHEAD_VOCAB)


def lookahead(n: int, seed: int) -> np.ndarray:
    """Sequences [n, 16] of uniform tokens except x[t+2] = π(x[t]) at t ≡ 0 (mod 3), π a fixed random permutation
    of the 128 tokens: the next token at t + 1 is π of the token *two* back, with a uniform token between."""
    sequences = np.random.default_rng(seed).integers(0, LOOKAHEAD_VOCAB, (n, 16))
    sequences[:, 2::3] = PERMUTATION[sequences[:, 0::3][:, : sequences[:, 2::3].shape[1]]]
    return sequences


def lookahead_losses(seed: int, tmp_path) -> tuple[float, float]:
    """(vanilla, mtp:2) next-token loss at the planted positions (t ≡ 1 mod 3, predicting x[t+1] = π(x[t−1])) on
    fresh sequences, after 200 steps of 32 from the same initialisation (2 layers × 64)."""
    losses = []
    for heads in (1, 2):
        model = build_lm(gpt2_config(n_layer=2, d_model=64, n_head=2, vocab_size=LOOKAHEAD_VOCAB), seed=seed)
        add_heads(model, heads)
        train(model, MultiTokenTask(lookahead(20000, seed), model, seed=seed),
              TrainConfig(steps=200, batch_size=32, lr=3e-3, warmup_frac=0.05, eval_every=200, checkpoint_every=200,
                          device="cpu", progress=False), tmp_path / f"heads-{heads}")
        tokens = torch.from_numpy(lookahead(512, 99))
        with torch.no_grad():
            next_token = head_losses(model.eval(), model, tokens, tokens, reduction="none")[0]
        losses.append(float(next_token[:, 1::3].mean()))
    return losses[0], losses[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_heads_learn_a_look_ahead_task_faster_than_one(seed, tmp_path):
    """Vanilla must learn to attend two back and apply π at t + 1; with mtp:2, head 2 at t is asked for π(x[t])
    from x[t] itself, so the trunk is trained to compute it at t, where head 1 at t + 1 can read it: the next-token
    loss at the planted positions falls faster (measured: docs/language.md)."""
    vanilla, mtp = lookahead_losses(seed, tmp_path)
    assert mtp < 0.6 * vanilla and vanilla < np.log(LOOKAHEAD_VOCAB) / 2  # both learning; two heads well ahead


def test_extra_heads_are_saved_beside_an_ordinary_model_and_resume_exactly(corpus, tmp_path, monkeypatch):
    straight = train_lm(settings(corpus, tmp_path, objective="mtp:3", out=str(tmp_path / "straight")))
    final = straight.checkpoint
    assert (final / HEADS_FILE).is_file()
    assert json.loads((final / "forethought.json").read_text())["objective"] == "mtp:3"
    loaded = LMCheckpoint.load(final).model  # an ordinary causal LM: its own weights, no heads
    assert extra_heads(loaded) is None and type(loaded).__name__ == "GPT2LMHeadModel"
    trained = {k: v for k, v in straight.model.state_dict().items() if not k.startswith("mtp_heads.")}
    assert trained.keys() == loaded.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in loaded.state_dict().items())
    interrupted_at_step_four(settings(corpus, tmp_path, objective="mtp:3"), monkeypatch)
    (step_2,) = list_checkpoints(tmp_path / "run")
    good = (step_2 / HEADS_FILE).read_bytes()
    (step_2 / HEADS_FILE).write_bytes(good[: len(good) // 2])  # a torn heads file is named, never used:
    with pytest.raises(ForethoughtError, match=f"{HEADS_FILE} was changed or damaged"):  # by its digest …
        train_lm(settings(corpus, tmp_path, objective="mtp:3"))
    digests = (step_2 / DIGESTS_FILE).read_bytes()
    (step_2 / DIGESTS_FILE).unlink()
    with pytest.raises(ForethoughtError, match=f"cannot read .*{HEADS_FILE}"):  # … and, without one, on reading
        train_lm(settings(corpus, tmp_path, objective="mtp:3"))
    (step_2 / DIGESTS_FILE).write_bytes(digests)
    (step_2 / HEADS_FILE).write_bytes(good)
    resumed = train_lm(settings(corpus, tmp_path, objective="mtp:3"))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history == straight.history


@pytest.mark.parametrize("overrides, message", [
    (dict(objective="mtp:0"), "objective must be next-token or mtp:K with K in 1 … 16, got 'mtp:0'"),
    (dict(objective="mtp"), "objective must be next-token or mtp:K with K in 1 … 16, got 'mtp'"),
    (dict(objective="mtp:2", myopic=True), "objective mtp:2 trains positions for later tokens: it cannot be "
                                           "`myopic` too"),
])
def test_bad_objectives_are_one_line_errors(overrides, message, tmp_path):
    with pytest.raises(ForethoughtError, match=f"^{message}$"):
        LMTrainConfig(**overrides, out=str(tmp_path / "run"))
    assert objective_heads("next-token") == 1 and objective_heads("mtp:4") == 4
