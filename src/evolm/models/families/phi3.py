"""The Phi-3 family (Abdin et al., 2024, Phi-3 Technical Report): Llama's block with fused projections.

Differences from Llama, all in the checkpoint rather than the computation:

* one ``qkv_proj`` whose output rows are ``[q (H*D) | k (K*D) | v (K*D)]``, split into evolm's
  ``q_proj``/``k_proj``/``v_proj`` on load and concatenated again on save;
* one ``gate_up_proj`` whose rows are ``[gate | up]`` (SwiGLU, Shazeer, 2020), split into
  ``gate_proj``/``up_proj`` on load and fused on save;
* optional partial rotary embedding (``partial_rotary_factor``), a sliding window on every layer
  (``sliding_window``), and LongRoPE scaling (Ding et al., 2024) with separate short and long
  per-frequency factors, switched on the largest position in use versus
  ``original_max_position_embeddings``.

Keeping separate projections costs one extra matmul launch per block and keeps every linear layer
addressable by its Llama name (LoRA, quantisation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import CheckpointError, ConfigError
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
_QKV = re.compile(r"^(model\.layers\.\d+\.self_attn)\.qkv_proj\.weight$")
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.mlp)\.gate_up_proj\.weight$")


def _normalised_rope(hf: dict) -> dict:
    """``hf`` with its RoPE parameters read as transformers' Phi-3 reads them: the legacy scaling
    names ``"su"`` and ``"yarn"`` both mean LongRoPE, and a top-level
    ``original_max_position_embeddings`` wins over the one inside the RoPE dict."""
    p = rope_params(hf)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind in ("su", "yarn", "longrope"):
        p["rope_type"] = "longrope"
        p.pop("type", None)
        if hf.get("original_max_position_embeddings") is not None:
            p["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    elif kind not in (None, "default"):
        raise ConfigError(f"phi3 rope_scaling type {kind!r} is not supported; Phi-3 uses 'default' or 'longrope'")
    return {**{k: v for k, v in hf.items() if k != "rope_scaling"}, "rope_parameters": p}


def _config_from_hf(hf: dict) -> DecoderConfig:
    hf = _normalised_rope(hf)
    c = int(need(hf, "hidden_size"))
    n_heads = int(need(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or c // n_heads)
    rope = rope_from_hf(hf, head_dim)
    window = hf.get("sliding_window")
    return DecoderConfig(
        family="phi3",
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "num_hidden_layers")),
        max_seq_len=max_seq_len_from_hf(hf, rope),
        attention=AttentionConfig(
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            rope=rope,
        ),
        mlp=MLPConfig(
            hidden_size=int(need(hf, "intermediate_size")),
            gated=True,
            activation=activation_from_hf(hf.get("hidden_act", "silu")),
        ),
        norm=NormConfig(kind="rmsnorm", eps=float(hf.get("rms_norm_eps", 1e-5))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=int(window) if window is not None else None,
        extra=extra_from_hf(hf),
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    hf: dict[str, Any] = {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads,
        "hidden_act": _HF_ACT[cfg.mlp.activation],
        "max_position_embeddings": max_position_to_hf(cfg.max_seq_len, a.rope),
        "rms_norm_eps": cfg.norm.eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "sliding_window": cfg.sliding_window,
        **rope_to_hf(a.rope, a.head_dim),
    }
    if a.head_dim * a.n_heads != cfg.hidden_size:
        hf["head_dim"] = a.head_dim
    hf.update(dict(cfg.extra))
    return hf


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    a = cfg.attention
    sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
    out: StateDict = {}
    for name, t in state.items():
        if m := _QKV.match(name):
            if t.shape[0] != sum(sizes):
                raise CheckpointError(
                    f"{name} has {t.shape[0]} output rows; the config implies q+k+v = {sizes} = {sum(sizes)}"
                )
            q, k, v = t.split(sizes, dim=0)  # (H*D, C), (K*D, C), (K*D, C)
            out |= {f"{m[1]}.q_proj.weight": q, f"{m[1]}.k_proj.weight": k, f"{m[1]}.v_proj.weight": v}
        elif m := _GATE_UP.match(name):
            if t.shape[0] != 2 * cfg.mlp.hidden_size:
                raise CheckpointError(
                    f"{name} has {t.shape[0]} output rows; the config implies 2 * intermediate_size = "
                    f"{2 * cfg.mlp.hidden_size}"
                )
            gate, up = t.chunk(2, dim=0)  # (I, C) each
            out |= {f"{m[1]}.gate_proj.weight": gate, f"{m[1]}.up_proj.weight": up}
        else:
            out[name] = t
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    out: StateDict = {}
    for name, t in state.items():
        if name.endswith((".self_attn.k_proj.weight", ".self_attn.v_proj.weight", ".mlp.up_proj.weight")):
            continue  # written with its partner below
        if name.endswith(".self_attn.q_proj.weight"):
            p = name.removesuffix(".q_proj.weight")
            qkv = [state[f"{p}.{x}_proj.weight"] for x in "qkv"]
            out[f"{p}.qkv_proj.weight"] = torch.cat(qkv, dim=0).contiguous()  # (H*D + 2*K*D, C)
        elif name.endswith(".mlp.gate_proj.weight"):
            p = name.removesuffix(".gate_proj.weight")
            out[f"{p}.gate_up_proj.weight"] = torch.cat([t, state[f"{p}.up_proj.weight"]], dim=0).contiguous()
        else:
            out[name] = t
    return out


FAMILIES = {
    "phi3": Family(
        name="phi3",
        model_types=("phi3",),
        architecture="Phi3ForCausalLM",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
    )
}
