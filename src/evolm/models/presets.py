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
    # DeepSeek-V2-Lite (DeepSeek-AI, 2024): multi-head latent attention, DeepSeekMoE, 15.7B (2.4B active)
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "kv_lora_rank": 512,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
        "max_position_embeddings": 163840,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": 100000,
        "eos_token_id": 100001,
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
    # A ~15M-parameter (~6M active) Mixtral-style MoE (Jiang et al., 2024): 8 experts, top-2, with
    # the Switch balancing loss (transformers' router_aux_loss_coef convention) for CPU pretraining.
    "mixtral-tiny": {
        "model_type": "mixtral",
        "vocab_size": 8192,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # A ~4M-parameter BERT (Devlin et al., 2019) for masked-LM quickstarts; id 1 is <mask>, id 0 the
    # document separator of the byte-level BPE tokenizer the pretraining loop trains for it.
    "bert-tiny": {
        "model_type": "bert",
        "architectures": ["BertForMaskedLM"],
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "pad_token_id": 0,
        "mask_token_id": 1,
    },
    # ELECTRA (Clark et al., 2020) discriminator with the generator pretraining trains beside it
    # (a quarter of its width, sharing its embeddings); about 3M parameters together.
    "electra-tiny": {
        "model_type": "electra",
        "architectures": ["ElectraForPreTraining"],
        "vocab_size": 4096,
        "embedding_size": 128,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
        "mask_token_id": 1,
        "evolm_generator": {
            "vocab_size": 4096,
            "embedding_size": 128,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 1,
            "max_position_embeddings": 512,
            "pad_token_id": 0,
            "mask_token_id": 1,
        },
    },
    # A tiny T5 (gated-GELU MLP, head tied to the embedding as in v1.0) for CPU pretraining demos;
    # span corruption's sentinels are its top ids.
    "t5-tiny": {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": 640,
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "n_positions": 256,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
    },
    # A tiny BART for CPU pretraining demos; the top id is the infilling <mask>.
    "bart-tiny": {
        "model_type": "bart",
        "architectures": ["BartForConditionalGeneration"],
        "vocab_size": 640,
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "max_position_embeddings": 256,
        "decoder_start_token_id": 2,
        "pad_token_id": 1,
        "eos_token_id": 2,
    },
    # The base Transformer of Vaswani et al. (2017): 6+6 layers, d_model 512, 8 heads, d_ff 2048,
    # a shared 37k-token source/target vocabulary (WMT'14 En-De), ~63M parameters.
    "transformer-2017": {
        "model_type": "transformer",
        "vocab_size": 37000,
        "d_model": 512,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "num_heads": 8,
        "d_ff": 2048,
        "max_position_embeddings": 1024,
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
