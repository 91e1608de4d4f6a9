"""Language models on text: presets and sources, checkpoints that load offline everywhere, bad input, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import BertConfig, GPT2LMHeadModel

from forethought.core.errors import ForethoughtError
from forethought.core.files import DIGESTS_FILE
from forethought.models.checkpoint import list_checkpoints
from forethought.models.gpt2 import build_lm, gpt2_config
from forethought.models.lm import LMCheckpoint, LMTrainConfig, lm_to_train, train_lm
from forethought.models.sources import model_folder
from forethought.models.tasks.text import TextTask
from forethought.probes.residuals import bridge_residuals, load_bridge, model_residuals


def settings(corpus, tmp_path, **overrides) -> LMTrainConfig:
    values = dict(corpus=corpus, model="gpt2-micro", seq_len=16, steps=4, batch_size=4, lr=3e-3,
                  eval_every=2, eval_batches=1, checkpoint_every=2, tokens_root=str(tmp_path / "tokens"),
                  out=str(tmp_path / "run"), progress=False)
    return LMTrainConfig.from_settings(**{**values, **overrides})


def test_presets_and_architectures_from_folders(tmp_path):
    small = lm_to_train(LMTrainConfig(model="gpt2-small"), vocab_size=50257)
    assert (small.config.n_layer, small.config.n_embd, small.config.n_head) == (12, 768, 12)
    assert 124e6 < small.num_parameters() < 125e6  # GPT-2 small (tied embeddings)
    source = build_lm(
        gpt2_config(n_layer=2, d_model=32, n_head=2, vocab_size=50257, n_positions=64, dropout=0.1), seed=7
    )
    source.save_pretrained(tmp_path / "src")
    fresh = lm_to_train(LMTrainConfig(model=str(tmp_path / "src"), seed=0), vocab_size=50257)
    tuned = lm_to_train(LMTrainConfig(model=str(tmp_path / "src"), from_pretrained=True), vocab_size=50257)
    assert fresh.config.n_embd == 32 and not torch.equal(fresh.transformer.wte.weight, source.transformer.wte.weight)
    assert torch.equal(tuned.transformer.wte.weight, source.transformer.wte.weight)
    undropped = lm_to_train(LMTrainConfig(model=str(tmp_path / "src"), from_pretrained=True, dropout=0.0), 50257)
    assert tuned.config.attn_pdrop == 0.1 and undropped.config.attn_pdrop == 0.0  # the model's own unless set
    assert {m.p for m in undropped.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    with pytest.raises(ForethoughtError, match="seq_len 128 exceeds the 64 positions"):
        lm_to_train(LMTrainConfig(model=str(tmp_path / "src"), seq_len=128), vocab_size=50257)


def test_other_families_train_and_bad_models_are_named(corpus, llama_folder, tmp_path):
    fresh = lm_to_train(LMTrainConfig(model=str(llama_folder), seed=1), vocab_size=300)
    tuned = lm_to_train(LMTrainConfig(model=str(llama_folder), from_pretrained=True), vocab_size=300)
    original = LMCheckpoint.load(llama_folder).model
    assert type(fresh).__name__ == "LlamaForCausalLM" and fresh.config.num_key_value_heads == 2
    assert torch.equal(tuned.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not torch.equal(fresh.model.embed_tokens.weight, original.model.embed_tokens.weight)
    myopic_run = train_lm(settings(corpus, tmp_path, model=str(llama_folder), tokenizer=str(llama_folder), myopic=True,
                                   from_pretrained=True, precision="bfloat16", gradient_checkpointing=True,
                                   steps=2, out=str(tmp_path / "myopic-llama")))  # myopic fine-tuning, frugal
    assert LMCheckpoint.load(myopic_run.checkpoint).description["myopic"] is True
    assert not myopic_run.model.is_gradient_checkpointing and all(
        torch.isfinite(torch.tensor(r["train_loss"])) for r in myopic_run.history)
    result = train_lm(settings(corpus, tmp_path, model=str(llama_folder), tokenizer=str(llama_folder),
                               from_pretrained=True, out=str(tmp_path / "llama")))  # fine-tuning, vanilla
    assert result.checkpoint.name == "step-0000004" and all(torch.isfinite(torch.tensor(r["train_loss"]))
                                                           for r in result.history)
    tuned_checkpoint = LMCheckpoint.load(tmp_path / "llama")
    assert type(tuned_checkpoint.model).__name__ == "LlamaForCausalLM"
    assert not torch.equal(tuned_checkpoint.model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertModel"]).save_pretrained(tmp_path / "bert")
    with pytest.raises(ForethoughtError, match=r"bert holds a BertModel \(bert\), not a causal language model"):
        lm_to_train(LMTrainConfig(model=str(tmp_path / "bert")), vocab_size=50257)
    with pytest.raises(ForethoughtError, match="holds a BertModel, expected a causal language model"):
        lm_to_train(LMTrainConfig(model=str(tmp_path / "bert"), from_pretrained=True), vocab_size=50257)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForethoughtError, match="empty has no config.json"):
        lm_to_train(LMTrainConfig(model=str(tmp_path / "empty")), vocab_size=50257)
    with pytest.raises(ForethoughtError, match="`from_pretrained` needs a folder or hub id; 'gpt2-tiny' is a preset"):
        LMTrainConfig(model="gpt2-tiny", from_pretrained=True)
    build_lm(gpt2_config(n_layer=1, d_model=16, n_head=2, vocab_size=23), seed=0).save_pretrained(tmp_path / "v23")
    with pytest.raises(ForethoughtError, match="the tokenizer has 50257 tokens but .*v23 has a vocabulary of 23"):
        train_lm(settings(corpus, tmp_path, model=str(tmp_path / "v23"), from_pretrained=True))
    assert not (tmp_path / "run").exists()  # refused before writing anything


def test_checkpoint_loads_offline_in_transformers_and_transformer_lens(corpus, tmp_path):
    result = train_lm(settings(corpus, tmp_path))
    assert result.checkpoint.name == "step-0000004" and model_folder(tmp_path / "run") == str(result.checkpoint)
    checkpoint = LMCheckpoint.load(tmp_path / "run")  # the run folder resolves to its newest checkpoint
    assert checkpoint.data() == settings(corpus, tmp_path).data()
    assert checkpoint.description["myopic"] is False and checkpoint.description["n_sequences"]["train"] > 0
    assert checkpoint.description["threads"] == torch.get_num_threads()  # the weights may depend on it
    assert checkpoint.description["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    tokens = torch.tensor([checkpoint.tokenizer.encode("the river of 3 and the hill of 4")])
    hf = GPT2LMHeadModel.from_pretrained(result.checkpoint).eval()
    torch.testing.assert_close(hf(tokens).logits, result.model(tokens).logits)
    bridge = load_bridge(result.checkpoint)  # TransformerBridge.boot_transformers(folder), no network
    torch.testing.assert_close(bridge_residuals(bridge, tokens), model_residuals(hf, tokens), atol=1e-5, rtol=1e-5)
    again = train_lm(settings(corpus, tmp_path))  # finished: nothing more to do, same weights
    assert torch.equal(again.model.transformer.wte.weight, result.model.transformer.wte.weight)
    with pytest.raises(ForethoughtError, match=r"holds a run with other settings \(lr: 0.003 → 0.001\)"):
        train_lm(settings(corpus, tmp_path, lr=1e-3))
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    del saved["dropout"]  # a run made before the workbench had this setting: it counts as the default
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(saved))
    assert torch.equal(
        train_lm(settings(corpus, tmp_path)).model.transformer.wte.weight, result.model.transformer.wte.weight
    )
    with pytest.raises(ForethoughtError, match=r"other settings \(dropout: None → 0.0\)"):
        train_lm(settings(corpus, tmp_path, dropout=0.0))
    weights = result.model.transformer.wte.weight
    assert torch.equal(
        train_lm(settings(corpus, tmp_path, out=str(tmp_path / "run") + "/")).model.transformer.wte.weight, weights
    )  # --out with a trailing slash: the same run
    (tmp_path / "run").rename(tmp_path / "moved")
    moved = train_lm(settings(corpus, tmp_path, out=str(tmp_path / "moved"), tokens_root=str(tmp_path / "elsewhere")))
    assert torch.equal(moved.model.transformer.wte.weight, weights)  # a moved run folder, token files kept elsewhere


def test_runs_saved_before_a_setting_existed_resume(corpus, tmp_path):
    """A setting added later (here ``precision``) takes its default for runs saved without it."""
    straight = train_lm(settings(corpus, tmp_path, out=str(tmp_path / "straight")))
    train_lm(settings(corpus, tmp_path))
    step_2, step_4 = list_checkpoints(tmp_path / "run")
    shutil.rmtree(step_4)
    state = torch.load(step_2 / "training_state.pt", weights_only=True)
    del state["config"]["precision"]
    torch.save(state, step_2 / "training_state.pt")
    (step_2 / DIGESTS_FILE).unlink()  # a run from before content digests were recorded
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    del recorded["precision"]
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(recorded))
    resumed = train_lm(settings(corpus, tmp_path))
    assert resumed.checkpoint.name == "step-0000004" and resumed.history == straight.history
    with pytest.raises(ForethoughtError, match="precision: 'auto' → 'bfloat16'"):
        train_lm(settings(corpus, tmp_path, precision="bfloat16"))


class Interrupted(Exception):
    pass


def interrupted_at_step_four(config: LMTrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``config`` until its fourth training batch is drawn, and kill it there (checkpoints every 2 steps)."""
    sample, calls = TextTask.sample, {"n": 0}

    def dies_at_step_four(self, batch_size, generator):
        if batch_size == 4 and len(self.sequences) > 10:  # training batches, not validation ones
            calls["n"] += 1
            if calls["n"] == 4:
                raise Interrupted
        return sample(self, batch_size, generator)

    with monkeypatch.context() as patched:
        patched.setattr(TextTask, "sample", dies_at_step_four)
        with pytest.raises(Interrupted):
            train_lm(config)


def test_interrupted_text_run_resumes_to_identical_weights(corpus, tmp_path, monkeypatch):
    straight = train_lm(settings(corpus, tmp_path, myopic=True, out=str(tmp_path / "straight")))
    interrupted_at_step_four(settings(corpus, tmp_path, myopic=True), monkeypatch)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002"]
    resumed = train_lm(settings(corpus, tmp_path, myopic=True))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history == straight.history


def test_a_damaged_checkpoint_is_named_never_resumed_from_or_loaded(corpus, tmp_path):
    """The second attack's finding: 8 flipped bytes near the end of model.safetensors resumed silently to other
    weights, and an edited training_state.pt loaded. Every file's digest is checked before a resume or a load; the
    resume falls back to an earlier checkpoint only when the damaged one is removed."""
    straight = train_lm(settings(corpus, tmp_path, out=str(tmp_path / "straight")))
    train_lm(settings(corpus, tmp_path))
    step_2, step_4 = list_checkpoints(tmp_path / "run")
    for name in ("model.safetensors", "training_state.pt"):
        path = step_4 / name
        good = path.read_bytes()
        damaged = bytearray(good)
        damaged[-100:-92] = bytes(b ^ 0xFF for b in damaged[-100:-92])
        path.write_bytes(bytes(damaged))
        message = rf"{path} was changed or damaged after it was written .*; remove {step_4} to resume from"
        with pytest.raises(ForethoughtError, match=message):
            train_lm(settings(corpus, tmp_path))  # the same run again: it would resume from step 4
        with pytest.raises(ForethoughtError, match=rf"{path} was changed or damaged"):
            LMCheckpoint.load(tmp_path / "run")
        path.write_bytes(good)
    shutil.rmtree(step_4)  # the user's choice: fall back to step 2, and train on to the same weights
    assert list_checkpoints(tmp_path / "run") == [step_2]
    resumed = train_lm(settings(corpus, tmp_path))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
