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

from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import CheckpointError, ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import StateDict, families_by_type
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
from evolm.models.renames import fuse, unfuse
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"phi3": "Phi3ForCausalLM"}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # fused as self_attn.qkv_proj
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")  # fused as mlp.gate_up_proj


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
    head_dim = head_dim_from_hf(hf)
    rope = rope_from_hf(hf, head_dim)
    window = hf.get("sliding_window")
    return DecoderConfig(
        family="phi3",
        **llama_style_from_hf(hf, rope, tie_embeddings=False),
        attention=AttentionConfig(**heads_from_hf(hf, head_dim), rope=rope),
        mlp=mlp_from_hf(hf, gated=True, default_act="silu"),
        norm=NormConfig(kind="rmsnorm", eps=float(hf.get("rms_norm_eps", 1e-5))),
        sliding_window=int(window) if window is not None else None,
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return llama_style_to_hf(
        cfg,
        _ARCH["phi3"],
        hidden_act=activation_to_hf(cfg.mlp.activation),
        rms_norm_eps=cfg.norm.eps,
        sliding_window=cfg.sliding_window,
        **head_dim_to_hf(cfg),
    )


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    a = cfg.attention
    sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]

    def split_qkv(name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if t.shape[0] != sum(sizes):
            raise CheckpointError(
                f"{name} has {t.shape[0]} output rows; the config implies q+k+v = {sizes} = {sum(sizes)}"
            )
        return t.split(sizes, dim=0)  # (H*D, C), (K*D, C), (K*D, C)

    def split_gate_up(name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if t.shape[0] != 2 * cfg.mlp.hidden_size:
            raise CheckpointError(
                f"{name} has {t.shape[0]} output rows; the config implies 2 * intermediate_size = "
                f"{2 * cfg.mlp.hidden_size}"
            )
        return t.chunk(2, dim=0)  # (I, C) each: gate, up

    state = unfuse(state, "self_attn.qkv_proj", _QKV, split_qkv, params=("weight",))
    return unfuse(state, "mlp.gate_up_proj", _GATE_UP, split_gate_up, params=("weight",))


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=0).contiguous()  # qkv: (H*D + 2*K*D, C); gate_up: (2I, C)

    state = fuse(state, _QKV, "self_attn.qkv_proj", cat, params=("weight",))
    return fuse(state, _GATE_UP, "mlp.gate_up_proj", cat, params=("weight",))


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _state_from_hf, _state_to_hf)
