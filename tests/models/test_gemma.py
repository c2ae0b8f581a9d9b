"""Parity of the Gemma families (gemma, gemma2) with transformers, and refusal of what evolm does not build."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from evolm.errors import ConfigError
from evolm.models.decoder import CausalLM
from evolm.models.family import family_for
from helpers.hf_parity import assert_cached_equals_full, assert_parity

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,  # deliberately not hidden_size / heads
    max_position_embeddings=64,
)

CASES = {
    "gemma": lambda: T.GemmaConfig(**SMALL),
    "gemma-mqa-bias-untied": lambda: T.GemmaConfig(
        **{**SMALL, "num_key_value_heads": 1}, attention_bias=True, tie_word_embeddings=False
    ),
    "gemma2": lambda: T.Gemma2Config(
        **{**SMALL, "num_hidden_layers": 3},
        query_pre_attn_scalar=32,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        sliding_window=4,  # shorter than the 13-token test sequence: the window matters
    ),
    "gemma2-no-softcap": lambda: T.Gemma2Config(
        **SMALL,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    _, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)


def test_gemma2_config_mapping_and_window(tmp_path):
    _, model, ids = assert_parity(CASES["gemma2"](), tmp_path, seq_len=13)
    cfg = model.cfg
    assert cfg.residual == "sandwich"
    assert cfg.layer_types == ("sliding", "full", "sliding")
    assert [cfg.window(i) for i in range(3)] == [4, None, 4]
    assert cfg.attention.scale == pytest.approx(32**-0.5)
    assert cfg.attention.softcap == 5.0 and cfg.final_softcap == 3.0
    assert cfg.embedding_scale == pytest.approx(8.0)
    # The same weights without the window give different logits: parity above exercised the window.
    full = CausalLM(cfg.replace(sliding_window=None, layer_types=())).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(full(ids), model(ids), atol=1e-3)


def test_gemma2_without_layer_types_alternates_sliding_first():
    hf = T.Gemma2Config(**{**SMALL, "num_hidden_layers": 4}, sliding_window=8).to_dict()
    del hf["layer_types"]  # configs written by transformers 4
    cfg = family_for("gemma2").config_from_hf(hf)
    assert cfg.layer_types == ("sliding", "full", "sliding", "full") and cfg.sliding_window == 8


def test_legacy_gelu_is_tanh_gelu():
    hf = {**T.GemmaConfig(**SMALL).to_dict(), "hidden_act": "gelu"}
    assert family_for("gemma").config_from_hf(hf).mlp.activation == "gelu_tanh"


@pytest.mark.parametrize(
    ("model_type", "field", "value"),
    [
        ("gemma", "use_bidirectional_attention", True),
        ("gemma2", "use_bidirectional_attention", True),
        ("gemma", "hidden_activation", "silu"),
    ],
)
def test_unsupported_options_raise(model_type, field, value):
    cfg = (T.GemmaConfig if model_type == "gemma" else T.Gemma2Config)(**SMALL)
    hf = {**cfg.to_dict(), field: value}
    with pytest.raises(ConfigError, match=field):
        family_for(model_type).config_from_hf(hf)
