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
from evolm.models.family import Family
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
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "num_hidden_layers")),
        max_seq_len=max_seq_len_from_hf(hf, rope),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            qkv_bias=bool(hf.get("use_qkv_bias", False)),
            rope=rope,
        ),
        mlp=MLPConfig(
            hidden_size=int(need(hf, "intermediate_size")),
            gated=True,
            activation=activation_from_hf(hf.get("hidden_act", "silu")),
        ),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-5)), bias=True),
        residual="parallel" if parallel else "pre",
        parallel_shared_norm=parallel,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        extra=extra_from_hf(hf),
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    hf: dict[str, Any] = {
        "model_type": "stablelm",
        "architectures": ["StableLmForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "hidden_act": _HF_ACT[cfg.mlp.activation],
        "max_position_embeddings": max_position_to_hf(cfg.max_seq_len, a.rope),
        "layer_norm_eps": cfg.norm.eps,
        "use_qkv_bias": a.qkv_bias,
        "use_parallel_residual": cfg.residual == "parallel",
        "qk_layernorm": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(a.rope, a.head_dim),
    }
    hf["partial_rotary_factor"] = a.rope.rotary_dim / a.head_dim  # always written: absent means 0.25
    hf.update(dict(cfg.extra))
    return hf


FAMILIES = {
    "stablelm": Family(
        name="stablelm",
        model_types=("stablelm",),
        architecture="StableLmForCausalLM",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
    )
}
