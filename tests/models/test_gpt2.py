"""Builders, save/load round trips, and loader errors."""

from __future__ import annotations

import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.models.gpt2 import GPT2RegressionModel, build_regression, load_model, regression_config


def test_regression_model_round_trips_through_save_pretrained(tiny_regression, tmp_path):
    tiny_regression.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, kind="regression").double()
    assert isinstance(loaded, GPT2RegressionModel)
    assert loaded.config.in_dim == 2 and loaded.config.out_dim == 1
    inputs = torch.randn(2, 5, 2, dtype=torch.float64)
    torch.testing.assert_close(loaded(inputs), tiny_regression(inputs), atol=1e-12, rtol=0)
    assert tiny_regression(inputs).shape == (2, 5, 1)


def test_lm_round_trips(tiny_lm, tokens, tmp_path):
    tiny_lm.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, kind="lm").double()
    torch.testing.assert_close(loaded(tokens).logits, tiny_lm(tokens).logits, atol=1e-12, rtol=0)


def test_seeded_builds_are_identical_and_leave_global_rng_alone():
    config = regression_config(in_dim=2, out_dim=1, n_layer=1, d_model=8, n_head=2)
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, b = build_regression(config, seed=1), build_regression(config, seed=1)
    assert torch.rand(1) == before
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_loader_errors_name_the_problem(tiny_lm, tmp_path):
    with pytest.raises(ForethoughtError, match="does not exist"):
        load_model(tmp_path / "nope", kind="regression")
    with pytest.raises(ForethoughtError, match="has no config.json"):
        load_model(tmp_path, kind="regression")
    tiny_lm.save_pretrained(tmp_path)
    with pytest.raises(ForethoughtError, match="holds a GPT2LMHeadModel, expected a GPT2RegressionModel"):
        load_model(tmp_path, kind="regression")
    with pytest.raises(ForethoughtError, match="d_model=10 is not divisible by n_head=3"):
        regression_config(in_dim=2, out_dim=1, n_layer=1, d_model=10, n_head=3)
