"""Named architecture presets, resolved by exact name.

Each preset is the ``config.json`` of a published checkpoint (or, for the ``*-tiny`` and
quickstart ones, a small model of the same shape family), turned into a typed ``DecoderConfig``
by its family's converter, so a preset and a downloaded checkpoint of that model always agree.
"""

from __future__ import annotations

from typing import Any

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (Radford et al., 2019)
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
    },
    # Pythia-160M (Biderman et al., 2023)
    "pythia-160m": {
        "model_type": "gpt_neox",
        "vocab_size": 50304,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "use_parallel_residual": True,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    # BLOOM-560M (BigScience, 2022)
    "bloom-560m": {"model_type": "bloom", "vocab_size": 250880, "hidden_size": 1024, "n_layer": 24, "n_head": 16},
    # SmolLM2-135M (Hugging Face, 2024): the real model evolm's tests run.
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Llama 3.2 1B (Meta, 2024)
    "llama-3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Mistral 7B v0.1 (Jiang et al., 2023)
    "mistral-7b": {
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
    },
    # Qwen2.5-0.5B (Qwen, 2024)
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # Qwen3-0.6B (Qwen, 2025)
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # Gemma 2B (Gemma Team, 2024)
    "gemma-2b": {
        "model_type": "gemma",
        "vocab_size": 256000,
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_hidden_layers": 18,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # Gemma 2 2B (Gemma Team, 2024)
    "gemma2-2b": {
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # Phi-3-mini-4k (Abdin et al., 2024)
    "phi3-mini-4k": {
        "model_type": "phi3",
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "sliding_window": 2047,
        "tie_word_embeddings": False,
    },
    # OLMo 1B (Groeneveld et al., 2024)
    "olmo-1b": {
        "model_type": "olmo",
        "vocab_size": 50304,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    # A ~10M-parameter Llama-style model for CPU quickstarts (vocab from a tokenizer you train).
    "llama-10m": {
        "model_type": "llama",
        "vocab_size": 8192,
        "hidden_size": 320,
        "intermediate_size": 864,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}


def preset_names() -> list[str]:
    """Every preset name."""
    return sorted(PRESETS)


def preset_hf_config(name: str) -> dict[str, Any]:
    """The HF ``config.json`` dict of preset ``name`` (a copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return dict(PRESETS[name])


def preset(name: str, **changes: Any) -> DecoderConfig:
    """The ``DecoderConfig`` of preset ``name``, with top-level fields optionally changed.

    Example: ``preset("llama-10m", vocab_size=4096)``.
    """
    from evolm.models.family import family_for

    hf = preset_hf_config(name)
    cfg = family_for(hf["model_type"]).config_from_hf(hf)
    return cfg.replace(**changes) if changes else cfg
