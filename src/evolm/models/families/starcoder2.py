"""StarCoder 2 (Lozhkov et al., 2024): a pre-LN decoder with LayerNorm, a plain GELU MLP and biases.

Differences from Llama: LayerNorm with bias (Ba et al., 2016) instead of RMSNorm; a two-layer
feed-forward ``c_proj(gelu_tanh(c_fc(x)))`` instead of SwiGLU; biases on every projection
(``use_bias``); RoPE over the whole head; a sliding window (Beltagy et al., 2020) on every layer
when ``sliding_window`` is set.

State mapping: ``mlp.c_fc`` / ``mlp.c_proj`` are evolm's ``mlp.up_proj`` / ``mlp.down_proj``;
every other tensor already has evolm's (Llama) name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import Family, StateDict
from evolm.models.hf_config import (
    activation_from_hf,
    extra_from_hf,
    max_position_to_hf,
    max_seq_len_from_hf,
    need,
    rope_from_hf,
    rope_params,
    rope_to_hf,
)
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_TO_EVOLM = {".mlp.c_fc.": ".mlp.up_proj.", ".mlp.c_proj.": ".mlp.down_proj."}
_TO_HF = {v: k for k, v in _TO_EVOLM.items()}


def _rename(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if old in name:
            return name.replace(old, new)
    return name


def _config_from_hf(hf: dict) -> DecoderConfig:
    c = int(need(hf, "hidden_size"))
    n_heads = int(need(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or c // n_heads)
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
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "num_hidden_layers")),
        max_seq_len=max_seq_len_from_hf(hf, rope),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            qkv_bias=bias,
            out_bias=bias,
            rope=rope,
        ),
        mlp=MLPConfig(
            hidden_size=int(need(hf, "intermediate_size")),
            gated=False,
            activation=activation_from_hf(hf.get("hidden_act", "gelu_pytorch_tanh")),
            bias=bias,
        ),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("norm_epsilon", 1e-5)), bias=True),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=int(window) if window is not None else None,
        extra=extra_from_hf(hf),
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    hf: dict[str, Any] = {
        "model_type": "starcoder2",
        "architectures": ["Starcoder2ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "hidden_act": _HF_ACT[cfg.mlp.activation],
        "max_position_embeddings": max_position_to_hf(cfg.max_seq_len, a.rope),
        "norm_epsilon": cfg.norm.eps,
        "use_bias": a.qkv_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": cfg.sliding_window,
        **rope_to_hf(a.rope, a.head_dim),
    }
    if a.head_dim * a.n_heads != cfg.hidden_size:
        hf["head_dim"] = a.head_dim
    hf.update(dict(cfg.extra))
    return hf


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    return {_rename(k, _TO_EVOLM): v for k, v in state.items()}


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    return {_rename(k, _TO_HF): v for k, v in state.items()}


FAMILIES = {
    "starcoder2": Family(
        name="starcoder2",
        model_types=("starcoder2",),
        architecture="Starcoder2ForCausalLM",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
    )
}
