"""StableLM (Stability AI; StableLM-3B-4E1T, StableLM 2, Bellagente et al., 2024).

Llama's tensor names and SwiGLU MLP, with LayerNorm with bias (Ba et al., 2016) instead of
RMSNorm, rotary embedding on only the first ``partial_rotary_factor`` of each head (0.25 when the
config omits it, as transformers assumes), optional q/k/v biases (``use_qkv_bias``) and an
optional parallel residual with one shared norm (``use_parallel_residual``, as in GPT-J)::

    pre (default)   x ─┬─────────────(+)─┬─────────────(+)──>
                       └─ ln1 ─ attn ─┘   └─ ln2 ─ mlp ─┘

    parallel        x ─┬──────────────────(+)──>
                       └─ ln1 ─┬─ attn ────┤
                               └─ mlp  ────┘

Not supported (refused with a ConfigError): ``qk_layernorm``, a separate bias-free LayerNorm for
every query and key head (StableLM 2 12B), which evolm's RMSNorm QK-norm cannot express.

The tensor names are already evolm's, so the state mappings are the identity.
"""

from __future__ import annotations

from typing import Any

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import families_by_type
from evolm.models.hf_config import (
    activation_to_hf,
    heads_from_hf,
    llama_style_from_hf,
    llama_style_to_hf,
    mlp_from_hf,
    need,
    rope_from_hf,
    rope_params,
)
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"stablelm": "StableLmForCausalLM"}


def _config_from_hf(hf: dict) -> DecoderConfig:
    if hf.get("qk_layernorm"):
        raise ConfigError(
            f"stablelm qk_layernorm={hf['qk_layernorm']!r} (a LayerNorm per query/key head) is not supported; "
            "evolm's QK-norm is one RMSNorm shared by all heads"
        )
    c = int(need(hf, "hidden_size"))
    n_heads = int(need(hf, "num_attention_heads"))
    head_dim = c // n_heads
    if hf.get("head_dim") not in (None, head_dim):  # transformers' attention and RoPE would disagree on D
        raise ConfigError(f"stablelm head_dim={hf['head_dim']!r} is not supported; StableLM uses hidden_size / heads")
    partial = float(rope_params(hf).get("partial_rotary_factor", 0.25))
    rope = rope_from_hf(hf, head_dim, partial=partial)
    parallel = bool(hf.get("use_parallel_residual", False))
    return DecoderConfig(
        family="stablelm",
        **llama_style_from_hf(hf, rope, tie_embeddings=False),
        attention=AttentionConfig(
            **heads_from_hf(hf, head_dim),
            qkv_bias=bool(hf.get("use_qkv_bias", False)),
            rope=rope,
        ),
        mlp=mlp_from_hf(hf, gated=True, default_act="silu"),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-5)), bias=True),
        residual="parallel" if parallel else "pre",
        parallel_shared_norm=parallel,
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    return llama_style_to_hf(
        cfg,
        _ARCH["stablelm"],
        hidden_act=activation_to_hf(cfg.mlp.activation),
        layer_norm_eps=cfg.norm.eps,
        use_qkv_bias=a.qkv_bias,
        use_parallel_residual=cfg.residual == "parallel",
        qk_layernorm=False,
        partial_rotary_factor=a.rope.rotary_dim / a.head_dim,  # always written: absent means 0.25
    )


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf)
