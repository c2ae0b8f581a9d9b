"""BLOOM (BigScience, Le Scao et al., 2022).

Pre-LN blocks with LayerNorm (with bias), an extra LayerNorm on the token embeddings
(``word_embeddings_layernorm``, from bitsandbytes' StableEmbedding; Dettmers et al., 2022), no
position embeddings but ALiBi's per-head linear distance penalty on attention scores (Press et
al., 2021), biases everywhere, a 4C tanh-GELU MLP and an LM head tied to the embeddings.

HF computes ALiBi as ``slope * key_position`` where key positions count only real tokens
(``cumsum(attention_mask) - 1``); evolm adds ``slope * (k_index - q_index)``. For one query the two
differ by a constant over its visible keys, which softmax ignores, so the attention is the same,
with and without left padding.

Checkpoint layout (``transformer.`` prefix optional: the BigScience checkpoints were saved from
``BloomModel`` without it):

============================================  ==========================================
HF tensor                                     evolm tensor
============================================  ==========================================
``word_embeddings``                           ``model.embed_tokens``
``word_embeddings_layernorm``                 ``model.embed_norm``
``h.N.input_layernorm``                       ``model.layers.N.input_layernorm``
``h.N.post_attention_layernorm``              ``model.layers.N.post_attention_layernorm``
``h.N.self_attention.query_key_value``        ``self_attn.{q,k,v}_proj`` (split per head)
``h.N.self_attention.dense``                  ``self_attn.o_proj``
``h.N.mlp.dense_h_to_4h`` / ``dense_4h_to_h``  ``mlp.up_proj`` / ``mlp.down_proj``
``ln_f``                                      ``model.norm``
============================================  ==========================================

``query_key_value`` has the Megatron per-head layout ``[head, (q, k, v), head_dim]`` shared with
GPT-NeoX.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.families.gpt_neox import fuse_qkv_per_head, split_qkv_per_head
from evolm.models.family import Family, StateDict
from evolm.models.hf_config import extra_from_hf, need
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

# BLOOM was trained on 2048-token sequences; its config.json rarely says so (``seq_length`` when it does).
_TRAINED_CONTEXT = 2048


def _config_from_hf(hf: dict) -> DecoderConfig:
    if hf.get("apply_residual_connection_post_layernorm", False):
        raise ConfigError(
            "apply_residual_connection_post_layernorm=True is not supported for bloom (the residual "
            "branch would carry the normalised input); only False is"
        )
    c = int(need(hf, "hidden_size", "n_embed"))
    n_heads = int(need(hf, "n_head", "num_attention_heads"))
    if c % n_heads:
        raise ConfigError(f"hidden_size={c} is not a multiple of n_head={n_heads}")
    return DecoderConfig(
        family="bloom",
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "n_layer", "num_hidden_layers")),
        max_seq_len=int(hf.get("seq_length") or hf.get("max_position_embeddings") or _TRAINED_CONTEXT),
        attention=AttentionConfig(
            n_heads=n_heads, n_kv_heads=n_heads, head_dim=c // n_heads, qkv_bias=True, out_bias=True, position="alibi"
        ),
        # BloomGelu is the tanh approximation of GELU (Hendrycks & Gimpel, 2016).
        mlp=MLPConfig(hidden_size=4 * c, gated=False, activation="gelu_tanh", bias=True),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_epsilon", 1e-5)), bias=True),
        residual="pre",
        embedding_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        extra=extra_from_hf(hf),
    )


def _config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    if cfg.mlp.hidden_size != 4 * cfg.hidden_size:
        raise ConfigError(
            f"mlp.hidden_size={cfg.mlp.hidden_size} cannot be written as a bloom config; BLOOM's MLP is "
            f"4 * hidden_size = {4 * cfg.hidden_size}"
        )
    hf: dict[str, Any] = {
        "model_type": "bloom",
        "architectures": ["BloomForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "n_layer": cfg.n_layers,
        "n_head": cfg.attention.n_heads,
        "layer_norm_epsilon": cfg.norm.eps,
        "apply_residual_connection_post_layernorm": False,
        "seq_length": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    hf.update(dict(cfg.extra))
    return hf


_LAYER_RENAMES = {
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
}
_TOP_RENAMES = {
    "word_embeddings.weight": "model.embed_tokens.weight",
    "word_embeddings_layernorm.weight": "model.embed_norm.weight",
    "word_embeddings_layernorm.bias": "model.embed_norm.bias",
    "ln_f.weight": "model.norm.weight",
    "ln_f.bias": "model.norm.bias",
}
_QKV = "self_attention.query_key_value"


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    h = cfg.attention.n_heads
    out: StateDict = {}
    for name, t in state.items():
        name = name.removeprefix("transformer.")
        m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            out[_TOP_RENAMES.get(name, name)] = t
            continue
        pre, module, kind = f"model.layers.{m[1]}.", m[2], m[3]
        if module == _QKV:
            for proj, part in zip("qkv", split_qkv_per_head(t, h), strict=True):
                out[f"{pre}self_attn.{proj}_proj.{kind}"] = part
        else:
            out[f"{pre}{_LAYER_RENAMES.get(module, module)}.{kind}"] = t
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    h = cfg.attention.n_heads
    top = {v: k for k, v in _TOP_RENAMES.items()}
    layer_renames = {v: k for k, v in _LAYER_RENAMES.items()}
    out: StateDict = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            out[name] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            out["transformer." + top[name]] = t
            continue
        pre, module, kind = f"transformer.h.{m[1]}.", m[2], m[3]
        if module in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # fused with q_proj below
        if module == "self_attn.q_proj":
            qkv = [state[f"model.layers.{m[1]}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{pre}{_QKV}.{kind}"] = fuse_qkv_per_head(*qkv, h)
        else:
            out[f"{pre}{layer_renames[module]}.{kind}"] = t
    return out


FAMILIES = {
    "bloom": Family(
        name="bloom",
        model_types=("bloom",),
        architecture="BloomForCausalLM",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
        ignored_keys=(),
    )
}
