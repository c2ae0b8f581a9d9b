"""The Gemma family (Gemma Team, 2024): Llama's layout with Gemma's own choices.

* ``gemma``: Gemma 1. RMSNorm scaled by ``1 + w`` (zero-initialised weight), token embeddings
  multiplied by ``sqrt(C)`` (the normaliser cast to the hidden dtype first, as HF does), GeGLU
  feed-forward (Shazeer, 2020) with the tanh-approximate GELU, a head width D independent of
  ``C / H``, and an LM head tied to the embeddings.
* ``gemma2``: Gemma 2 (Gemma Team, 2024b). Gemma 1 plus a "sandwich" of norms around both
  sub-layers (pre- and post-norm, Ding et al., 2021, CogView), a tanh soft-cap on attention
  scores and on output logits, a query scale of ``query_pre_attn_scalar ** -0.5`` instead of
  ``D ** -0.5``, and local sliding-window attention (Beltagy et al., 2020) interleaved with
  global attention layer by layer (sliding first).

Both keep HF's Llama tensor names (``input_layernorm``, ``pre_feedforward_layernorm``, ...), so
the state-dict mappings are the identity; only the configs differ.
"""

from __future__ import annotations

import math
from typing import Any

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import families_by_type
from evolm.models.hf_config import (
    activation_from_hf,
    activation_to_hf,
    heads_from_hf,
    layer_types_from_hf,
    layer_types_to_hf,
    llama_style_from_hf,
    llama_style_to_hf,
    need,
    rope_from_hf,
)
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM"}


def _activation(hf: dict) -> str:
    """The feed-forward activation as transformers 5 resolves it.

    Gemma 1 reads ``hidden_act`` and treats the legacy ``"gelu"`` of the original releases as the
    tanh approximation; transformers 4 read ``hidden_activation`` instead, so a config whose two
    fields disagree is ambiguous and refused. Gemma 2 reads ``hidden_activation`` only.
    """
    if hf["model_type"] == "gemma2":
        return activation_from_hf(hf.get("hidden_activation") or "gelu_pytorch_tanh")
    act = hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act == "gelu":
        act = "gelu_pytorch_tanh"
    legacy = hf.get("hidden_activation")
    if legacy is not None and activation_from_hf(legacy) != activation_from_hf(act):
        raise ConfigError(
            f"gemma config has hidden_act={hf.get('hidden_act')!r} and hidden_activation={legacy!r}, which "
            "transformers 5 and 4 resolve to different activations; set both to the same value"
        )
    return activation_from_hf(act)


def _config_from_hf(hf: dict) -> DecoderConfig:
    mt = hf["model_type"]
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(
            f"{mt} use_bidirectional_attention={hf['use_bidirectional_attention']!r} is not supported; "
            "evolm builds causal decoders only"
        )
    c = int(need(hf, "hidden_size"))
    head_dim = int(need(hf, "head_dim"))
    n_layers = int(need(hf, "num_hidden_layers"))
    rope = rope_from_hf(hf, head_dim)
    eps = float(hf.get("rms_norm_eps", 1e-6))
    bias = bool(hf.get("attention_bias", False))

    residual, scale, softcap, final_softcap = "pre", None, None, None
    window, layer_types = None, ()
    if mt == "gemma2":
        residual = "sandwich"
        scale = float(need(hf, "query_pre_attn_scalar")) ** -0.5
        softcap = hf.get("attn_logit_softcapping")
        final_softcap = hf.get("final_logit_softcapping")
        window = hf.get("sliding_window")
        layer_types = layer_types_from_hf(hf, n_layers)
        if not layer_types:  # configs written before layer_types: even layers slide, odd layers are global
            layer_types = tuple("sliding" if i % 2 == 0 else "full" for i in range(n_layers))
        if window is None or "sliding" not in layer_types:
            window, layer_types = None, ()

    return DecoderConfig(
        family=mt,
        **llama_style_from_hf(hf, rope, tie_embeddings=True),
        attention=AttentionConfig(
            **heads_from_hf(hf, head_dim),
            qkv_bias=bias,
            out_bias=bias,
            scale=scale,
            softcap=float(softcap) if softcap is not None else None,
            rope=rope,
        ),
        mlp=MLPConfig(hidden_size=int(need(hf, "intermediate_size")), gated=True, activation=_activation(hf)),
        norm=NormConfig(kind="rmsnorm", eps=eps, unit_offset=True),
        residual=residual,
        embedding_scale=math.sqrt(c),
        final_softcap=float(final_softcap) if final_softcap is not None else None,
        sliding_window=int(window) if window is not None else None,
        layer_types=layer_types,
    )


def _query_pre_attn_scalar(scale: float) -> float | int:
    """Invert ``scale = query_pre_attn_scalar ** -0.5``, as an int when it is one (it always is in
    released checkpoints)."""
    value = scale**-2
    return round(value) if abs(value - round(value)) < 1e-6 * max(1.0, value) else value


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a, act = cfg.attention, activation_to_hf(cfg.mlp.activation)
    fields: dict[str, Any] = {"head_dim": a.head_dim, "rms_norm_eps": cfg.norm.eps, "attention_bias": a.qkv_bias}
    if cfg.family == "gemma":
        fields["hidden_act"] = act
    else:
        types = cfg.layer_types or tuple("full" for _ in range(cfg.n_layers))
        fields.update(
            hidden_activation=act,
            query_pre_attn_scalar=_query_pre_attn_scalar(a.scale if a.scale is not None else a.head_dim**-0.5),
            attn_logit_softcapping=a.softcap,
            final_logit_softcapping=cfg.final_softcap,
            sliding_window=cfg.sliding_window,
            layer_types=layer_types_to_hf(types),
        )
    return llama_style_to_hf(cfg, _ARCH[cfg.family], **fields)


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf)
