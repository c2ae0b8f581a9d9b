"""Parity of the Llama-layout families (llama, mistral, qwen2, qwen3, olmo, olmo2) with transformers."""

from __future__ import annotations

import pytest
import transformers as T

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
    "llama": lambda: T.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "llama-mha-tied": lambda: T.LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=True),
    "llama3-rope": lambda: T.LlamaConfig(
        **SMALL,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-linear-rope": lambda: T.LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    ),
    "llama-dynamic-rope": lambda: T.LlamaConfig(
        **{**SMALL, "max_position_embeddings": 8},
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    ),
    "llama-yarn-rope": lambda: T.LlamaConfig(
        **SMALL,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral-window": lambda: T.MistralConfig(**SMALL, sliding_window=4),
    "qwen2": lambda: T.Qwen2Config(**SMALL),
    "qwen2-sliding-layers": lambda: T.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "qwen3": lambda: T.Qwen3Config(**SMALL, head_dim=24),
    "olmo": lambda: T.OlmoConfig(**SMALL, clip_qkv=0.3),
    "olmo2": lambda: T.Olmo2Config(**SMALL),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_transformers(case, tmp_path):
    hf_config = CASES[case]()
    _, model, ids = assert_parity(hf_config, tmp_path, seq_len=13)
    if case != "llama-dynamic-rope":  # dynamic NTK re-bases RoPE as the length grows: cached keys differ by design
        assert_cached_equals_full(model, ids)


def test_dynamic_rope_past_original_context(tmp_path):
    """Dynamic NTK scaling changes the base once the sequence passes max_position_embeddings."""
    hf_config = CASES["llama-dynamic-rope"]()  # max_position_embeddings=8, seq_len 13 > 8
    _, model, _ = assert_parity(hf_config, tmp_path, seq_len=13)
    assert model.cfg.max_seq_len == 32
