"""Parity of StarCoder 2 (LayerNorm, plain GELU MLP with c_fc/c_proj, biases, sliding window) with transformers."""

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
    bos_token_id=1,
    eos_token_id=2,
)

CASES = {
    "starcoder2": lambda: T.Starcoder2Config(**SMALL),
    "starcoder2-window-untied": lambda: T.Starcoder2Config(**SMALL, sliding_window=4, tie_word_embeddings=False),
    "starcoder2-no-bias": lambda: T.Starcoder2Config(**SMALL, use_bias=False, hidden_act="gelu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    _, model, ids = assert_parity(CASES[case](), tmp_path, seq_len=13)
    assert_cached_equals_full(model, ids)
    assert "model.layers.0.mlp.up_proj.weight" in model.state_dict()


def test_partial_rotary_raises():
    hf = {**T.Starcoder2Config(**SMALL).to_dict(), "partial_rotary_factor": 0.5}
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        family_for("starcoder2").config_from_hf(hf)
