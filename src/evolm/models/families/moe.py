"""Sparse mixture-of-experts families on the Llama block: the feed-forward is ``evolm.nn.moe.MoE``.

* ``mixtral`` (Jiang et al., 2024, Mixtral of Experts): Mistral's block with E experts per layer,
  top-2 softmax routing renormalised over the two (a softmax over the selected logits).
* ``qwen2_moe`` (Qwen Team, 2024, Qwen1.5-MoE / Qwen2-MoE): Qwen2's block (q/k/v biases); top-K
  softmax routing, optionally renormalised, plus an always-on shared expert scaled by
  ``sigmoid(shared_expert_gate(x))``; ``mlp_only_layers`` and ``decoder_sparse_step`` leave some
  layers dense.
* ``qwen3_moe`` (Qwen Team, 2025, Qwen3): Qwen3's block (per-head q/k RMSNorm) with top-K routing
  and no shared expert.

Checkpoints store one 2-D tensor per expert (Mixtral: ``block_sparse_moe.experts.N.w1/w3/w2``; Qwen:
``mlp.experts.N.gate_proj/up_proj/down_proj``); evolm holds them fused, ``mlp.experts.gate_up_proj``
(E, 2F, C) and ``mlp.experts.down_proj`` (E, C, F), as transformers 5 does in memory. Qwen2-MoE's
``mlp.shared_expert`` is evolm's (DeepSeek-named) ``mlp.shared_experts``.

The balancing-loss coefficient ``router_aux_loss_coef`` is transformers'; its loss sums the K
routing slots, K times evolm's (which is 1 when balanced), so ``aux_loss_coef = K * router_aux_loss_coef``
gives the same loss.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from evolm.models.config import DecoderConfig
from evolm.models.family import StateDict, families_by_type
from evolm.models.hf_config import (
    activation_from_hf,
    activation_to_hf,
    extra_from_hf,
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
from evolm.nn.moe import MoEConfig, fuse_expert_weights, split_expert_weights
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# Checkpoint fields evolm does not model (training-time jitter, output flags), kept for a faithful save.
_PASSTHROUGH = ("router_jitter_noise", "output_router_logits")

_MIXTRAL_NAMES = ("w1", "w3", "w2")  # Mixtral's (gate, up, down)


def _moe_layers(hf: dict, n_layers: int) -> tuple[int, ...]:
    """Qwen's MoE layers: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``."""
    dense = set(hf.get("mlp_only_layers") or ())
    step = int(hf.get("decoder_sparse_step") or 1)
    return tuple(i for i in range(n_layers) if i not in dense and (i + 1) % step == 0)


def _config_from_hf(hf: dict) -> DecoderConfig:
    mt = hf["model_type"]
    head_dim = head_dim_from_hf(hf)
    n_layers = int(need(hf, "num_hidden_layers"))
    rope = rope_from_hf(hf, head_dim, default_theta=1e6 if mt == "mixtral" else 10000.0)
    eps = float(hf.get("rms_norm_eps", 1e-5 if mt == "mixtral" else 1e-6))
    k = int(need(hf, "num_experts_per_tok"))
    moe_layers: tuple[int, ...] = ()
    if mt == "mixtral":
        n_experts, hidden = int(need(hf, "num_local_experts")), int(need(hf, "intermediate_size"))
        bias, qk_norm, shared, norm_topk = False, None, 0, True
    else:
        n_experts, hidden = int(need(hf, "num_experts", "num_local_experts")), int(need(hf, "moe_intermediate_size"))
        norm_topk = bool(hf.get("norm_topk_prob", False))
        moe_layers = _moe_layers(hf, n_layers)
        if mt == "qwen2_moe":
            bias, qk_norm, shared = (
                bool(hf.get("qkv_bias", True)),
                None,
                int(hf.get("shared_expert_intermediate_size") or 0),
            )
        else:
            bias, qk_norm, shared = bool(hf.get("attention_bias", False)), "head", 0

    window = hf.get("sliding_window") or None
    layer_types: tuple[str, ...] = ()
    if mt == "qwen2_moe":
        layer_types = layer_types_from_hf(hf, n_layers)
        if "sliding" not in layer_types:
            window, layer_types = None, ()
    elif mt == "qwen3_moe" and not hf.get("use_sliding_window", False):
        window = None

    moe = MoEConfig(
        n_experts=n_experts,
        top_k=k,
        expert_hidden=hidden,
        norm_topk=norm_topk,
        aux_loss_coef=k * float(hf.get("router_aux_loss_coef", 0.0) or 0.0),
        activation=activation_from_hf(hf.get("hidden_act", "silu")),
        shared_hidden=shared,
        shared_gate=shared > 0,
    )
    return DecoderConfig(
        family=mt,
        **{**llama_style_from_hf(hf, rope, tie_embeddings=False), "extra": _extra(hf)},
        attention=AttentionConfig(
            **heads_from_hf(hf, head_dim),
            qkv_bias=bias,
            out_bias=bias and mt == "qwen3_moe",
            qk_norm=qk_norm,
            qk_norm_eps=eps,
            rope=rope,
        ),
        mlp=mlp_from_hf(hf, gated=True, default_act="silu"),
        norm=NormConfig(kind="rmsnorm", eps=eps),
        sliding_window=int(window) if window is not None else None,
        layer_types=layer_types,
        moe=moe if (moe_layers or mt == "mixtral") else None,
        moe_layers=() if len(moe_layers) == n_layers else moe_layers,
    )


def _extra(hf: dict) -> tuple[tuple[str, object], ...]:
    return extra_from_hf(hf) + tuple((k, hf[k]) for k in _PASSTHROUGH if k in hf)


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a, mt, moe = cfg.attention, cfg.family, cfg.moe
    n_experts = moe.n_experts if moe is not None else 0
    fields: dict[str, Any] = {
        "head_dim": a.head_dim,
        "hidden_act": activation_to_hf(cfg.mlp.activation),
        "rms_norm_eps": cfg.norm.eps,
        "num_experts_per_tok": moe.top_k if moe is not None else 1,
        "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k if moe is not None else 0.0,
        "sliding_window": cfg.sliding_window,
    }
    if mt == "mixtral":
        fields.update(num_local_experts=n_experts, intermediate_size=moe.expert_hidden)
        return llama_style_to_hf(cfg, _ARCH[mt], **fields)
    layers = set(cfg.moe_layers or range(cfg.n_layers)) if moe is not None else set()
    fields.update(
        num_experts=n_experts,
        moe_intermediate_size=moe.expert_hidden if moe is not None else cfg.mlp.hidden_size,
        norm_topk_prob=moe.norm_topk if moe is not None else False,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(cfg.n_layers) if i not in layers],
        use_sliding_window=cfg.sliding_window is not None,
    )
    if mt == "qwen2_moe":
        types = cfg.layer_types or tuple("full" for _ in range(cfg.n_layers))
        fields.update(
            qkv_bias=a.qkv_bias,
            shared_expert_intermediate_size=moe.shared_hidden if moe is not None else 0,
            layer_types=layer_types_to_hf(types),
            max_window_layers=cfg.n_layers,
        )
    else:
        fields["attention_bias"] = a.qkv_bias
    return llama_style_to_hf(cfg, _ARCH[mt], **fields)


_MIXTRAL_BLOCK = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.")
_MLP = re.compile(r"^(model\.layers\.\d+\.)mlp\.(?=gate\.|experts\.)")
_QWEN_SHARED = re.compile(r"^(model\.layers\.\d+\.mlp\.)shared_expert\.")
_EVOLM_SHARED = re.compile(r"^(model\.layers\.\d+\.mlp\.)shared_experts\.")


def _rename(state: Mapping[str, torch.Tensor], pattern: re.Pattern, repl: str) -> StateDict:
    return {pattern.sub(repl, k): t for k, t in state.items()}


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    if cfg.family == "mixtral":
        return fuse_expert_weights(_rename(state, _MIXTRAL_BLOCK, r"\1mlp."), _MIXTRAL_NAMES)
    if cfg.family == "qwen2_moe":
        state = _rename(state, _QWEN_SHARED, r"\1shared_experts.")
    return fuse_expert_weights(state)


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    if cfg.family == "mixtral":
        return _rename(split_expert_weights(state, _MIXTRAL_NAMES), _MLP, r"\1block_sparse_moe.")
    if cfg.family == "qwen2_moe":
        state = _rename(state, _EVOLM_SHARED, r"\1shared_expert.")
    return split_expert_weights(state)


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _state_from_hf, _state_to_hf)
