"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention and DeepSeekMoE.

* ``deepseek_v2`` (DeepSeek-AI, 2024, DeepSeek-V2): Llama's pre-RMSNorm block with multi-head
  latent attention (``evolm.nn.mla``; low-rank compressed keys/values, decoupled RoPE in DeepSeek's
  interleaved pair layout, YaRN with a softmax-scale correction) and, after the first
  ``first_k_dense_replace`` dense layers, DeepSeekMoE feed-forward layers.
* ``deepseek_v3`` (DeepSeek-AI, 2024, DeepSeek-V3): the same block; ``rope_interleave`` may turn
  the pair layout off. Its checkpoints carry multi-token prediction layers after the last block
  (``model.layers.{n_layers + k}``); the causal LM drops them as transformers does, and
  ``mtp_state_from_hf`` maps them onto ``evolm.nn.mtp.MultiTokenPrediction`` for training.

Tensor names are those of the HF checkpoints (``self_attn.q_a_proj``, ``self_attn.kv_b_proj``,
``mlp.gate.weight``, ``mlp.shared_experts.*``); the state mappings drop the MTP layers and fuse the
per-expert tensors into ``evolm.nn.moe.Experts``' stacked ones (and split them again on save).
The MoE layers are ``evolm.nn.moe.MoE`` (routers in ``evolm.nn.router``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.decoder import DecoderLayer
from evolm.models.family import StateDict, families_by_type
from evolm.models.hf_config import (
    activation_from_hf,
    activation_to_hf,
    extra_from_hf,
    max_position_to_hf,
    max_seq_len_from_hf,
    mlp_from_hf,
    need,
    rope_from_hf,
    rope_to_hf,
)
from evolm.nn.mla import MLAConfig
from evolm.nn.moe import MoEConfig, fuse_expert_weights, split_expert_weights
from evolm.nn.mtp import MultiTokenPrediction
from evolm.nn.norm import NormConfig

_ARCH = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# Checkpoint fields the model does not use, kept verbatim for a faithful save: the count of MTP layers,
# and num_key_value_heads (latent attention expands keys and values per query head whatever it says;
# transformers' DeepSeek-V3 config defaults it to 128 for any number of heads).
_KEPT_FIELDS = ("num_nextn_predict_layers", "num_key_value_heads")


def _mla_from_hf(hf: dict) -> MLAConfig:
    rope_dim = int(need(hf, "qk_rope_head_dim"))
    q_lora = hf.get("q_lora_rank")
    return MLAConfig(
        n_heads=int(need(hf, "num_attention_heads")),
        kv_lora_rank=int(need(hf, "kv_lora_rank")),
        qk_nope_head_dim=int(need(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(need(hf, "v_head_dim")),
        rope=rope_from_hf(hf, rope_dim),
        q_lora_rank=int(q_lora) if q_lora is not None else None,
        bias=bool(hf.get("attention_bias", False)),
        rope_interleave=hf["model_type"] == "deepseek_v2" or bool(hf.get("rope_interleave", True)),
    )


def _moe_from_hf(hf: dict) -> MoEConfig:
    """DeepSeekMoE (Dai et al., 2024): fine-grained routed experts plus always-on shared experts.

    V2 routes by softmax affinity, optionally group-limited (a group scored by its best expert), and
    weighs experts by the raw probabilities (transformers' V2 ignores ``norm_topk_prob``). V3 routes by
    sigmoid affinity plus the balancing bias ``e_score_correction_bias``, group-limited (a group scored
    by its two best experts), with the weights renormalised when ``norm_topk_prob``.
    """
    v3 = hf["model_type"] == "deepseek_v3"
    grouped = v3 or hf.get("topk_method") == "group_limited_greedy"
    if not v3 and hf.get("topk_method", "greedy") not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"deepseek_v2 topk_method={hf['topk_method']!r}; supported: 'greedy', 'group_limited_greedy'")
    expert_hidden = int(need(hf, "moe_intermediate_size"))
    return MoEConfig(
        n_experts=int(need(hf, "n_routed_experts")),
        top_k=int(need(hf, "num_experts_per_tok")),
        expert_hidden=expert_hidden,
        router="sigmoid" if v3 else "softmax",
        norm_topk=v3 and bool(hf.get("norm_topk_prob", True)),
        routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=int(hf.get("n_group") or 1) if grouped else 1,
        topk_group=int(hf.get("topk_group") or 1) if grouped else 1,
        correction_bias=v3,
        activation=activation_from_hf(hf.get("hidden_act", "silu")),
        shared_hidden=expert_hidden * int(hf.get("n_shared_experts") or 0),
    )


def _config_from_hf(hf: dict) -> DecoderConfig:
    mt = hf["model_type"]
    n_layers = int(need(hf, "num_hidden_layers"))
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    moe = _moe_from_hf(hf) if first_dense < n_layers and hf.get("n_routed_experts") else None
    attention = _mla_from_hf(hf)
    kept = _KEPT_FIELDS + (("norm_topk_prob",) if mt == "deepseek_v2" else ())
    extra = extra_from_hf(hf) + tuple((k, hf[k]) for k in kept if k in hf)
    return DecoderConfig(
        family=mt,
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=int(need(hf, "hidden_size")),
        n_layers=n_layers,
        max_seq_len=max_seq_len_from_hf(hf, attention.rope),
        attention=attention,
        mlp=mlp_from_hf(hf, gated=True, default_act="silu", bias=bool(hf.get("mlp_bias", False))),
        norm=NormConfig(kind="rmsnorm", eps=float(hf.get("rms_norm_eps", 1e-6))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=moe,
        moe_layers=tuple(range(first_dense, n_layers)) if moe is not None else (),
        extra=extra,
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a, mt = cfg.attention, cfg.family
    hf: dict[str, Any] = {
        "model_type": mt,
        "architectures": [_ARCH[mt]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_heads,
        "max_position_embeddings": max_position_to_hf(cfg.max_seq_len, a.rope),
        "tie_word_embeddings": cfg.tie_embeddings,
        **rope_to_hf(a.rope, a.qk_rope_head_dim),
        "rms_norm_eps": cfg.norm.eps,
        "hidden_act": activation_to_hf(cfg.mlp.activation),
        "attention_bias": a.bias,
        "kv_lora_rank": a.kv_lora_rank,
        "q_lora_rank": a.q_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "v_head_dim": a.v_head_dim,
        "first_k_dense_replace": cfg.n_layers,
    }
    if mt == "deepseek_v2":
        hf["mlp_bias"] = cfg.mlp.bias
    else:
        hf["rope_interleave"] = a.rope_interleave
    if cfg.moe is not None:
        m = cfg.moe
        first = cfg.moe_layers[0] if cfg.moe_layers else 0
        if tuple(range(first, cfg.n_layers)) != (cfg.moe_layers or tuple(range(cfg.n_layers))):
            raise ConfigError(
                f"{mt}: moe_layers={cfg.moe_layers}; DeepSeek checkpoints make every layer from one on MoE"
            )
        hf.update(
            first_k_dense_replace=first,
            n_routed_experts=m.n_experts,
            num_experts_per_tok=m.top_k,
            moe_intermediate_size=m.expert_hidden,
            n_shared_experts=m.shared_hidden // m.expert_hidden,
            routed_scaling_factor=m.routed_scale,
            n_group=m.n_group,
            topk_group=m.topk_group,
        )
        if mt == "deepseek_v2":
            hf["topk_method"] = "group_limited_greedy" if m.n_group > 1 else "greedy"
        else:
            hf["norm_topk_prob"] = m.norm_topk
    hf.update(dict(cfg.extra))
    return hf


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    """The checkpoint's tensors less its multi-token prediction layers (``model.layers.{>= n_layers}``),
    per-expert tensors fused as ``evolm.nn.moe.Experts`` holds them."""
    out = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m is None or int(m.group(1)) < cfg.n_layers:
            out[name] = t
    return fuse_expert_weights(out)


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    """One 2-D tensor per expert, as the checkpoints store them."""
    return split_expert_weights(state)


def mtp_state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    """The DeepSeek-V3 checkpoint's MTP layers as the state of ``evolm.nn.mtp.MultiTokenPrediction``.

    Checkpoint layer ``model.layers.{n_layers + k}`` becomes depth ``k``: ``enorm``, ``hnorm`` and
    ``eh_proj`` keep their names, ``shared_head.norm`` becomes ``post_norm`` and the transformer block's
    tensors (``self_attn``, ``mlp``, its norms) go under ``mtp_block``. The per-layer copies of the
    embedding and the output head (``embed_tokens``, ``shared_head.head``) are dropped: the MTP module
    shares the main model's.

    Args:
        state: Checkpoint tensors (HF names).
        cfg: The main model's config.

    Returns:
        Tensors named as ``MultiTokenPrediction.state_dict()`` (``depths.K.*``).
    """
    out = {}
    for name, t in state.items():
        m = _LAYER.match(name)
        if m is None or int(m.group(1)) < cfg.n_layers:
            continue
        k, rest = int(m.group(1)) - cfg.n_layers, name[m.end() :]
        if rest.startswith(("embed_tokens.", "shared_head.head.")):
            continue
        if rest.startswith("shared_head.norm."):
            rest = "post_norm." + rest.removeprefix("shared_head.norm.")
        elif not rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
            rest = "mtp_block." + rest
        out[f"depths.{k}.{rest}"] = t
    return fuse_expert_weights(out)


FAMILIES = families_by_type(
    _ARCH, _config_from_hf, _config_to_hf, state_from_hf=_state_from_hf, state_to_hf=_state_to_hf
)


def build_mtp(cfg: DecoderConfig, depth: int | None = None) -> MultiTokenPrediction:
    """DeepSeek-V3's multi-token prediction module for a model of config ``cfg``.

    Each depth's block is a ``DecoderLayer`` numbered after the main model's layers (as the
    checkpoint numbers them), so it is built as layer ``n_layers + k`` would be.

    Args:
        cfg: The main model's config.
        depth: D, the number of depths; default the checkpoint's ``num_nextn_predict_layers`` (else 1).

    Returns:
        An untrained ``MultiTokenPrediction`` (load ``mtp_state_from_hf`` into it to start from a checkpoint).
    """
    d = depth if depth is not None else int(dict(cfg.extra).get("num_nextn_predict_layers") or 1)
    block_cfg = cfg.replace(moe_layers=()) if cfg.moe is not None else cfg  # MoE blocks, as the last layers
    blocks = [DecoderLayer(block_cfg, cfg.n_layers + k) for k in range(d)]
    return MultiTokenPrediction(cfg.hidden_size, blocks, cfg.attention.rope, eps=cfg.norm.eps)
