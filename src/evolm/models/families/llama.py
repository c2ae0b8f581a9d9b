"""The Llama family and the checkpoints that share its tensor layout.

* ``llama``: Llama 1/2/3 (Touvron et al., 2023; Meta, 2024): pre-RMSNorm, SwiGLU, RoPE, GQA.
* ``mistral``: Llama plus a sliding attention window (Jiang et al., 2023).
* ``qwen2``: Llama plus q/k/v biases and optional per-layer sliding windows (Qwen2, 2024).
* ``qwen3``: Llama plus per-head RMSNorm on queries and keys (Qwen3, 2025).
* ``olmo``: parameter-free LayerNorm and optional q/k/v clipping (Groeneveld et al., 2024).
* ``olmo2``: norms on sub-layer outputs and QK-norm over the full projection (OLMo 2, 2024).

All share HF Llama's tensor names, so the state-dict mappings are the identity; only the
configs differ.
"""

from __future__ import annotations

from typing import Any

from evolm.models.config import DecoderConfig
from evolm.models.family import families_by_type
from evolm.models.hf_config import (
    activation_to_hf,
    head_dim_from_hf,
    heads_from_hf,
    layer_types_from_hf,
    layer_types_to_hf,
    llama_style_from_hf,
    llama_style_to_hf,
    mlp_from_hf,
    need,
    rope_from_hf,
)
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo": "OlmoForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
}


def _config_from_hf(hf: dict) -> DecoderConfig:
    mt = hf["model_type"]
    head_dim = head_dim_from_hf(hf)
    n_layers = int(need(hf, "num_hidden_layers"))
    rope = rope_from_hf(hf, head_dim)
    eps = float(hf.get("rms_norm_eps", 1e-6))
    bias = bool(hf.get("attention_bias", mt == "qwen2"))
    norm = NormConfig(kind="rmsnorm", eps=eps)
    qk_norm = None
    clip = None
    residual = "pre"
    if mt == "qwen3":
        qk_norm = "head"
    elif mt == "olmo":
        norm = NormConfig(kind="layernorm", eps=1e-5, affine=False, bias=False)
        clip = hf.get("clip_qkv")
    elif mt == "olmo2":
        qk_norm, residual = "full", "output"

    window = hf.get("sliding_window")
    layer_types: tuple[str, ...] = ()
    if mt in ("qwen2", "qwen3"):
        layer_types = layer_types_from_hf(hf, n_layers)
        if not layer_types:  # older configs: windows from use_sliding_window / max_window_layers
            use = bool(hf.get("use_sliding_window", False)) and window is not None
            first = int(hf.get("max_window_layers", n_layers))
            layer_types = tuple("sliding" if use and i >= first else "full" for i in range(n_layers))
        if "sliding" not in layer_types:
            window, layer_types = None, ()
    elif mt != "mistral":
        window = None

    return DecoderConfig(
        family=mt,
        **llama_style_from_hf(hf, rope, tie_embeddings=False),
        attention=AttentionConfig(
            **heads_from_hf(hf, head_dim),
            qkv_bias=bias,
            out_bias=bias and mt != "qwen2",
            qk_norm=qk_norm,
            qk_norm_eps=eps,
            clip_qkv=float(clip) if clip is not None else None,
            rope=rope,
        ),
        mlp=mlp_from_hf(hf, gated=True, default_act="silu", bias=bool(hf.get("mlp_bias", False))),
        norm=norm,
        residual=residual,
        sliding_window=int(window) if window is not None else None,
        layer_types=layer_types,
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a, mt = cfg.attention, cfg.family
    fields: dict[str, Any] = {"head_dim": a.head_dim, "hidden_act": activation_to_hf(cfg.mlp.activation)}
    if mt != "olmo":
        fields["rms_norm_eps"] = cfg.norm.eps
    if mt in ("llama", "qwen3", "olmo", "olmo2"):
        fields["attention_bias"] = a.qkv_bias
    if mt == "llama":
        fields["mlp_bias"] = cfg.mlp.bias
    if mt == "olmo":
        fields["clip_qkv"] = a.clip_qkv
    if mt == "mistral":
        fields["sliding_window"] = cfg.sliding_window
    if mt in ("qwen2", "qwen3"):
        types = cfg.layer_types or tuple("full" for _ in range(cfg.n_layers))
        fields["use_sliding_window"] = cfg.sliding_window is not None
        fields["sliding_window"] = cfg.sliding_window
        fields["max_window_layers"] = types.index("sliding") if "sliding" in types else cfg.n_layers
        fields["layer_types"] = layer_types_to_hf(types)
    return llama_style_to_hf(cfg, _ARCH[mt], **fields)


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf)
