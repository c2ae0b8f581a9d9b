"""Presets: each builds, and matches the parameter count transformers gives the same config."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import evolm
from evolm.errors import ConfigError
from evolm.models.presets import preset_hf_config


@pytest.mark.parametrize("name", evolm.preset_names())
def test_preset_parameter_count_matches_transformers(name):
    hf = preset_hf_config(name)
    model_type = hf.pop("model_type")
    hf_cfg = T.AutoConfig.for_model(model_type, **hf)
    with torch.device("meta"):
        ref = T.AutoModelForCausalLM.from_config(hf_cfg)
        ours = evolm.build_model(evolm.preset(name), device="meta")
    n_ref = sum(p.numel() for p in ref.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_ref


def test_unknown_preset_lists_names():
    with pytest.raises(ConfigError, match="llama-10m"):
        evolm.preset("llama-11m")


def test_build_model_is_seeded_and_runs():
    a = evolm.build_model("llama-10m", seed=3)
    b = evolm.build_model("llama-10m", seed=3)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    n = sum(p.numel() for p in a.parameters())
    assert 8e6 < n < 14e6  # the ~10M quickstart model
