"""StarCoder 2 (Lozhkov et al., 2024): a pre-LN decoder with LayerNorm, a plain GELU MLP and biases.

Differences from Llama: LayerNorm with bias (Ba et al., 2016) instead of RMSNorm; a two-layer
feed-forward ``c_proj(gelu_tanh(c_fc(x)))`` instead of SwiGLU; biases on every projection
(``use_bias``); RoPE over the whole head; a sliding window (Beltagy et al., 2020) on every layer
when ``sliding_window`` is set.

State mapping: ``mlp.c_fc`` / ``mlp.c_proj`` are evolm's ``mlp.up_proj`` / ``mlp.down_proj``;
every other tensor already has evolm's (Llama) name.
"""

from __future__ import annotations

from typing import Any

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import families_by_type
from evolm.models.hf_config import (
    activation_to_hf,
    head_dim_from_hf,
    head_dim_to_hf,
    heads_from_hf,
    llama_style_from_hf,
    llama_style_to_hf,
    mlp_from_hf,
    rope_from_hf,
    rope_params,
)
from evolm.models.renames import Renames
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"starcoder2": "Starcoder2ForCausalLM"}
_RENAMES = Renames((".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj."), anchored=False)


def _config_from_hf(hf: dict) -> DecoderConfig:
    head_dim = head_dim_from_hf(hf)
    partial = rope_params(hf).get("partial_rotary_factor", 1.0)
    if partial != 1.0:  # transformers' StarCoder 2 rotates the whole head regardless
        raise ConfigError(
            f"starcoder2 partial_rotary_factor={partial!r} is not supported; StarCoder 2 rotates whole heads"
        )
    rope = rope_from_hf(hf, head_dim)
    bias = bool(hf.get("use_bias", True))
    window = hf.get("sliding_window")
    return DecoderConfig(
        family="starcoder2",
        **llama_style_from_hf(hf, rope, tie_embeddings=True),
        attention=AttentionConfig(**heads_from_hf(hf, head_dim), qkv_bias=bias, out_bias=bias, rope=rope),
        mlp=mlp_from_hf(hf, gated=False, default_act="gelu_pytorch_tanh", bias=bias),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("norm_epsilon", 1e-5)), bias=True),
        sliding_window=int(window) if window is not None else None,
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return llama_style_to_hf(
        cfg,
        _ARCH["starcoder2"],
        hidden_act=activation_to_hf(cfg.mlp.activation),
        norm_epsilon=cfg.norm.eps,
        use_bias=cfg.attention.qkv_bias,
        sliding_window=cfg.sliding_window,
        **head_dim_to_hf(cfg),
    )


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _RENAMES.state_from_hf, _RENAMES.state_to_hf)
