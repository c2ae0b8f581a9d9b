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
    if model_type not in T.CONFIG_MAPPING:
        pytest.skip(f"{model_type!r} has no transformers counterpart; its own tests count its parameters")
    archs = hf.pop("architectures", None)
    generator = hf.pop("evolm_generator", None)  # ELECTRA pretraining: the generator trained beside it
    hf_cfg = T.AutoConfig.for_model(model_type, **hf)
    with torch.device("meta"):
        ref = getattr(T, archs[0])(hf_cfg) if archs else T.AutoModelForCausalLM.from_config(hf_cfg)
        ours = evolm.build_model(evolm.preset(name), device="meta")
        n_ref = sum(p.numel() for p in ref.parameters())
        if generator is not None:  # its token/position/type tables are the discriminator's
            gen = T.ElectraForMaskedLM(T.AutoConfig.for_model(model_type, **generator))
            emb = gen.electra.embeddings
            shared = (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings)
            n_ref += sum(p.numel() for p in gen.parameters()) - sum(m.weight.numel() for m in shared)
    assert sum(p.numel() for p in ours.parameters()) == n_ref


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
