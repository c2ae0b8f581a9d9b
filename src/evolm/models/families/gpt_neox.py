"""GPT-NeoX (Black et al., 2022) and the Pythia suite (Biderman et al., 2023).

LayerNorm (with bias), rotary positions on a fraction of each head (``rotary_pct``, 0.25 in
Pythia; Su et al., 2021), biases on every projection, an exact-GELU MLP and an untied output
head. With ``use_parallel_residual`` (the default) attention and MLP read the same input through
their own norms and are summed, GPT-J style; otherwise the block is sequential pre-LN::

    parallel    x + attn(ln1(x)) + mlp(ln2(x))
    sequential  h = x + attn(ln1(x));  h + mlp(ln2(h))

Checkpoint layout (``gpt_neox.`` prefix):

===========================================  ==================================================
HF tensor                                    evolm tensor
===========================================  ==================================================
``embed_in``                                 ``model.embed_tokens``
``layers.N.input_layernorm``                 ``model.layers.N.input_layernorm``
``layers.N.post_attention_layernorm``        ``model.layers.N.post_attention_layernorm``
``layers.N.attention.query_key_value``       ``self_attn.{q,k,v}_proj`` (split per head)
``layers.N.attention.dense``                 ``self_attn.o_proj``
``layers.N.mlp.dense_h_to_4h`` / ``4h_to_h``  ``mlp.up_proj`` / ``mlp.down_proj``
``final_layer_norm``                         ``model.norm``
``embed_out`` (no prefix)                    ``lm_head``
===========================================  ==================================================

The fused ``query_key_value`` projection is Megatron's layout: its 3C output rows are grouped
per head as ``[head, (q, k, v), head_dim]``, not as three contiguous blocks. BLOOM uses the same
layout, and ``split_qkv_per_head``/``fuse_qkv_per_head`` serve both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.family import StateDict, families_by_type
from evolm.models.hf_config import (
    activation_to_hf,
    llama_style_from_hf,
    max_position_to_hf,
    mlp_from_hf,
    need,
    rope_from_hf,
    rope_params,
    rope_to_hf,
)
from evolm.models.renames import Renames, fuse, unfuse
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"gpt_neox": "GPTNeoXForCausalLM"}
# The per-layer fused projection keeps HF's module name, under evolm's self_attn, until split.
QKV, QKV_PARTS = "self_attn.query_key_value", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_RENAMES = Renames(  # (HF, evolm), at the start of a name
    ("gpt_neox.embed_in.", "model.embed_tokens."),
    ("gpt_neox.final_layer_norm.", "model.norm."),
    ("embed_out.", "lm_head."),
    ("gpt_neox.layers.{i}.attention.dense.", "model.layers.{i}.self_attn.o_proj."),
    ("gpt_neox.layers.{i}.attention.", "model.layers.{i}.self_attn."),
    ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.", "model.layers.{i}.mlp.up_proj."),
    ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.", "model.layers.{i}.mlp.down_proj."),
    ("gpt_neox.layers.{i}.", "model.layers.{i}."),
)


def split_qkv_per_head(t: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused Megatron q/k/v projection whose rows are laid out ``[head, (q, k, v), head_dim]``.

    Args:
        t: Weight (3 * H * D, C) or bias (3 * H * D,).
        n_heads: H.

    Returns:
        ``(q, k, v)``, each (H * D, C) or (H * D,), contiguous.
    """
    rest = t.shape[1:]
    per_head = t.view(n_heads, 3, -1, *rest)  # (H, 3, D, *rest)
    return tuple(per_head[:, i].reshape(-1, *rest).contiguous() for i in range(3))  # 3 x (H*D, *rest)


def fuse_qkv_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``split_qkv_per_head``: three (H * D, *rest) tensors -> one (3 * H * D, *rest)."""
    rest = q.shape[1:]
    per_head = torch.stack([z.view(n_heads, -1, *rest) for z in (q, k, v)], dim=1)  # (H, 3, D, *rest)
    return per_head.reshape(-1, *rest)  # (3*H*D, *rest)


def _config_from_hf(hf: dict) -> DecoderConfig:
    c = int(need(hf, "hidden_size"))
    n_heads = int(need(hf, "num_attention_heads"))
    if c % n_heads:
        raise ConfigError(f"hidden_size={c} is not a multiple of num_attention_heads={n_heads}")
    head_dim = c // n_heads
    # transformers 5 keeps these in rope_parameters; older configs use rotary_pct / rotary_emb_base.
    params = rope_params(hf)
    partial = float(params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    rope = rope_from_hf(hf, head_dim, default_theta=float(hf.get("rotary_emb_base", 10000.0)), partial=partial)
    bias = bool(hf.get("attention_bias", True))
    return DecoderConfig(
        family="gpt_neox",
        **llama_style_from_hf(hf, rope, tie_embeddings=False),
        attention=AttentionConfig(
            n_heads=n_heads, n_kv_heads=n_heads, head_dim=head_dim, qkv_bias=bias, out_bias=bias, rope=rope
        ),
        mlp=mlp_from_hf(hf, gated=False, default_act="gelu", bias=True),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-5)), bias=True),
        residual="parallel" if hf.get("use_parallel_residual", True) else "pre",
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    a = cfg.attention
    if cfg.residual not in ("parallel", "pre") or cfg.parallel_shared_norm:
        raise ConfigError(f"residual={cfg.residual!r} cannot be written as a gpt_neox config; 'parallel' or 'pre'")
    rope = rope_to_hf(a.rope, a.head_dim)
    hf: dict[str, Any] = {
        "model_type": "gpt_neox",
        "architectures": [_ARCH["gpt_neox"]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp.hidden_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": a.n_heads,
        "hidden_act": activation_to_hf(cfg.mlp.activation, gelu_tanh="gelu_new"),
        "max_position_embeddings": max_position_to_hf(cfg.max_seq_len, a.rope),
        "layer_norm_eps": cfg.norm.eps,
        "use_parallel_residual": cfg.residual == "parallel",
        "attention_bias": a.qkv_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        # The names both transformers 4 and 5 read (5 folds them into rope_parameters); the
        # rotary fraction is always written because GPT-NeoX's default is 0.25, not 1.
        "rotary_pct": a.rope.rotary_dim / a.head_dim,
        "rotary_emb_base": rope.pop("rope_theta"),
    }
    rope.pop("partial_rotary_factor", None)
    hf.update(rope)  # rope_scaling (and original_max_position_embeddings) when scaled
    hf.update(dict(cfg.extra))
    return hf


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    h = cfg.attention.n_heads
    return unfuse(_RENAMES.state_from_hf(state), QKV, QKV_PARTS, lambda _, t: split_qkv_per_head(t, h))


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    h = cfg.attention.n_heads
    return _RENAMES.state_to_hf(fuse(state, QKV_PARTS, QKV, lambda qkv: fuse_qkv_per_head(*qkv, h)))


# Buffers older Pythia checkpoints saved: RoPE frequencies and the causal-mask tensors.
_BUFFERS = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")
FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _state_from_hf, _state_to_hf, _BUFFERS)
