"""Parity of Phi-3 (fused qkv/gate_up checkpoints, partial rotary, LongRoPE) with transformers."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from evolm.errors import CheckpointError, ConfigError
from evolm.models.family import family_for
from helpers.hf_parity import assert_cached_equals_full, assert_parity, build_hf

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def longrope(original: int, partial: float = 0.5) -> T.Phi3Config:
    """LongRoPE with distinct short/long factors over rotary_dim/2 = 16 * partial / 2 frequencies."""
    n = int(16 * partial) // 2
    return T.Phi3Config(
        **SMALL,
        original_max_position_embeddings=original,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.5 * i for i in range(n)],
            "long_factor": [2.0 + 3.0 * i for i in range(n)],
        },
    )


CASES = {
    "phi3": lambda: T.Phi3Config(**SMALL),
    "phi3-tied-mha": lambda: T.Phi3Config(**{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "phi3-partial-window": lambda: T.Phi3Config(
        **SMALL,
        sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.75},
    ),
    # original 4 < prefix 5 < 13 tokens: every step (cached or not) uses the long factors.
    "phi3-longrope-long": lambda: longrope(original=4),
    # original 32 > 13 tokens: the short factors throughout.
    "phi3-longrope-short": lambda: longrope(original=32, partial=1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    _, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)


def test_longrope_switches_factors_mid_prompt(tmp_path):
    """original 8 < 13 tokens: the whole prompt uses the long factors, as in transformers, and the
    result differs from the short-factor model on the same weights."""
    _, model, ids = assert_parity(longrope(original=8), tmp_path, seq_len=13)
    s = model.cfg.attention.rope.scaling
    assert s.kind == "longrope" and s.original_max_position == 8 and s.factor == 8.0
    with torch.no_grad():
        long_logits = model(ids)[:, :8]
        short_logits = model(ids[:, :8])  # 8 positions <= original: short factors
    assert not torch.allclose(long_logits, short_logits, atol=1e-3)


def test_fused_projections_split_and_fuse():
    fam = family_for("phi3")
    hf = build_hf(CASES["phi3"]())
    cfg = fam.config_from_hf(hf.config.to_dict())
    state = fam.state_from_hf(hf.state_dict(), cfg)
    a = hf.model.layers[1]
    q, k, v = a.self_attn.qkv_proj.weight.split([64, 32, 32])  # H*D, K*D, K*D
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], q)
    assert torch.equal(state["model.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(state["model.layers.1.self_attn.v_proj.weight"], v)
    gate, up = a.mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(state["model.layers.1.mlp.gate_proj.weight"], gate)
    assert torch.equal(state["model.layers.1.mlp.up_proj.weight"], up)
    back = fam.state_to_hf(state, cfg)
    assert back.keys() == hf.state_dict().keys()
    assert all(torch.equal(back[n], t) for n, t in hf.state_dict().items())


def test_legacy_su_scaling_is_longrope():
    hf = longrope(original=4).to_dict()
    hf.pop("rope_parameters")
    hf["rope_scaling"] = {"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    hf["partial_rotary_factor"] = 0.5
    cfg = family_for("phi3").config_from_hf(hf)
    assert cfg.attention.rope.scaling.kind == "longrope"
    assert cfg.attention.rope.scaling.original_max_position == 4


def test_unsupported_rope_type_raises():
    hf = {**T.Phi3Config(**SMALL).to_dict(), "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}
    with pytest.raises(ConfigError, match="llama3"):
        family_for("phi3").config_from_hf(hf)


def test_wrong_fused_width_raises():
    fam = family_for("phi3")
    cfg = fam.config_from_hf(T.Phi3Config(**SMALL).to_dict())
    with pytest.raises(CheckpointError, match="qkv_proj"):
        fam.state_from_hf({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(100, 64)}, cfg)
