"""Parity of StableLM (LayerNorm, partial rotary, optional q/k/v bias and shared-norm parallel
residual) with transformers."""

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
    num_key_value_heads=2,
    max_position_embeddings=64,
)

CASES = {
    "stablelm": lambda: T.StableLmConfig(**SMALL),  # partial_rotary_factor defaults to 0.25
    "stablelm2-qkv-bias": lambda: T.StableLmConfig(**SMALL, use_qkv_bias=True, partial_rotary_factor=0.5),
    "stablelm-parallel-tied": lambda: T.StableLmConfig(**SMALL, use_parallel_residual=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    _, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)


def test_qk_layernorm_raises():
    hf = {**T.StableLmConfig(**SMALL).to_dict(), "qk_layernorm": True}
    with pytest.raises(ConfigError, match="qk_layernorm"):
        family_for("stablelm").config_from_hf(hf)
