"""Parity of Phi-1/1.5/2 (parallel residual with one shared LayerNorm, partial rotary, biased LM head)
with transformers."""

from __future__ import annotations

import pytest
import transformers as T

from evolm.errors import ConfigError
from evolm.models.family import family_for
from helpers.hf_parity import assert_cached_equals_full, assert_parity

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)

CASES = {
    "phi": lambda: T.PhiConfig(**SMALL),  # partial_rotary_factor defaults to 0.5
    "phi2-gqa-tied": lambda: T.PhiConfig(
        **SMALL, num_key_value_heads=2, partial_rotary_factor=0.25, tie_word_embeddings=True
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    _, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)
    cfg = model.cfg
    assert cfg.residual == "parallel" and cfg.parallel_shared_norm and cfg.lm_head_bias
    assert cfg.attention.rope.rotary_dim == (8 if case == "phi" else 4)


def test_missing_partial_rotary_factor_means_half():
    hf = T.PhiConfig(**SMALL).to_dict()
    hf.pop("partial_rotary_factor", None)
    (hf.get("rope_parameters") or {}).pop("partial_rotary_factor", None)
    assert family_for("phi").config_from_hf(hf).attention.rope.rotary_dim == 8


def test_qk_layernorm_raises():
    hf = {**T.PhiConfig(**SMALL).to_dict(), "qk_layernorm": True}
    with pytest.raises(ConfigError, match="qk_layernorm"):
        family_for("phi").config_from_hf(hf)
