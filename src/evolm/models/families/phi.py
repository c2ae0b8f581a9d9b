"""Phi-1, Phi-1.5 and Phi-2 (Gunasekar et al., 2023; Li et al., 2023): a parallel-residual decoder.

Each block normalises once and feeds the same LayerNorm output to attention and to the MLP, whose
outputs are added to the residual together (the GPT-J layout; Wang & Komatsuzaki, 2021)::

    x ──┬────────────────────────────(+)──>
        └── ln ──┬── attn ────────────┤
                 └── mlp  ────────────┘

Rotary embedding covers only the first ``partial_rotary_factor`` of each head (0.5 when the config
omits it, as transformers assumes); every projection and the LM head carry biases; the MLP is
``fc2(gelu_tanh(fc1(x)))``.

State mapping (HF -> evolm): ``self_attn.dense`` -> ``self_attn.o_proj``, ``mlp.fc1`` ->
``mlp.up_proj``, ``mlp.fc2`` -> ``mlp.down_proj``, ``model.final_layernorm`` -> ``model.norm``.
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

_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_TO_EVOLM = {
    ".self_attn.dense.": ".self_attn.o_proj.",
    ".mlp.fc1.": ".mlp.up_proj.",
    ".mlp.fc2.": ".mlp.down_proj.",
    "model.final_layernorm.": "model.norm.",
}
_TO_HF = {v: k for k, v in _TO_EVOLM.items()}


def _rename(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if old in name:
            return name.replace(old, new)
    return name


def _config_from_hf(hf: dict) -> DecoderConfig:
    if hf.get("qk_layernorm"):
        raise ConfigError(
            f"phi qk_layernorm={hf['qk_layernorm']!r} (LayerNorm with bias on each query/key head) is not "
            "supported; evolm's QK-norm is RMSNorm"
        )
    c = int(need(hf, "hidden_size"))
    n_heads = int(need(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or c // n_heads)
    partial = float(rope_params(hf).get("partial_rotary_factor", 0.5))
    rope = rope_from_hf(hf, head_dim, partial=partial)
    return DecoderConfig(
        family="phi",
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "num_hidden_layers")),
        max_seq_len=max_seq_len_from_hf(hf, rope),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            qkv_bias=True,
            out_bias=True,
            rope=rope,
        ),
        mlp=MLPConfig(
            hidden_size=int(need(hf, "intermediate_size")),
            gated=False,
            activation=activation_from_hf(hf.get("hidden_act", "gelu_new")),
            bias=True,
        ),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-5)), bias=True),
        residual="parallel",
        parallel_shared_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        lm_head_bias=True,
        extra=extra_from_hf(hf),
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    hf: dict[str, Any] = {
        "model_type": "phi",
        "architectures": ["PhiForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "hidden_act": _HF_ACT[cfg.mlp.activation],
        "max_position_embeddings": max_position_to_hf(cfg.max_seq_len, a.rope),
        "layer_norm_eps": cfg.norm.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "qk_layernorm": False,
        **rope_to_hf(a.rope, a.head_dim),
    }
    hf["partial_rotary_factor"] = a.rope.rotary_dim / a.head_dim  # always written: absent means 0.5
    if a.head_dim * a.n_heads != cfg.hidden_size:
        hf["head_dim"] = a.head_dim
    hf.update(dict(cfg.extra))
    return hf


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    return {_rename(k, _TO_EVOLM): v for k, v in state.items()}


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    return {_rename(k, _TO_HF): v for k, v in state.items()}


FAMILIES = {
    "phi": Family(
        name="phi",
        model_types=("phi",),
        architecture="PhiForCausalLM",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
    )
}
