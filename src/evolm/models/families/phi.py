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

_ARCH = {"phi": "PhiForCausalLM"}
_RENAMES = Renames(  # (HF, evolm), anywhere in a name
    (".self_attn.dense.", ".self_attn.o_proj."),
    (".mlp.fc1.", ".mlp.up_proj."),
    (".mlp.fc2.", ".mlp.down_proj."),
    ("model.final_layernorm.", "model.norm."),
    anchored=False,
)


def _config_from_hf(hf: dict) -> DecoderConfig:
    if hf.get("qk_layernorm"):
        raise ConfigError(
            f"phi qk_layernorm={hf['qk_layernorm']!r} (LayerNorm with bias on each query/key head) is not "
            "supported; evolm's QK-norm is RMSNorm"
        )
    head_dim = head_dim_from_hf(hf)
    partial = float(rope_params(hf).get("partial_rotary_factor", 0.5))
    rope = rope_from_hf(hf, head_dim, partial=partial)
    return DecoderConfig(
        family="phi",
        **llama_style_from_hf(hf, rope, tie_embeddings=False),
        attention=AttentionConfig(**heads_from_hf(hf, head_dim), qkv_bias=True, out_bias=True, rope=rope),
        mlp=mlp_from_hf(hf, gated=False, default_act="gelu_new", bias=True),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-5)), bias=True),
        residual="parallel",
        parallel_shared_norm=True,
        lm_head_bias=True,
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    return llama_style_to_hf(
        cfg,
        _ARCH["phi"],
        hidden_act=activation_to_hf(cfg.mlp.activation, gelu_tanh="gelu_new"),
        layer_norm_eps=cfg.norm.eps,
        qk_layernorm=False,
        partial_rotary_factor=a.rope.rotary_dim / a.head_dim,  # always written: absent means 0.5
        **head_dim_to_hf(cfg),
    )


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _RENAMES.state_from_hf, _RENAMES.state_to_hf)
