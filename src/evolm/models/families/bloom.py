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

from collections.abc import Mapping
from typing import Any

import torch

from evolm.errors import ConfigError
from evolm.models.config import DecoderConfig
from evolm.models.families.gpt_neox import QKV, QKV_PARTS, fuse_qkv_per_head, split_qkv_per_head
from evolm.models.family import StateDict, families_by_type
from evolm.models.hf_config import extra_from_hf, need
from evolm.models.renames import Renames, fuse, unfuse
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_ARCH = {"bloom": "BloomForCausalLM"}
_RENAMES = Renames(  # (HF, evolm), at the start of a name, HF's without its optional "transformer."
    ("word_embeddings.", "model.embed_tokens."),
    ("word_embeddings_layernorm.", "model.embed_norm."),
    ("ln_f.", "model.norm."),
    ("h.{i}.self_attention.dense.", "model.layers.{i}.self_attn.o_proj."),
    ("h.{i}.self_attention.", "model.layers.{i}.self_attn."),
    ("h.{i}.mlp.dense_h_to_4h.", "model.layers.{i}.mlp.up_proj."),
    ("h.{i}.mlp.dense_4h_to_h.", "model.layers.{i}.mlp.down_proj."),
    ("h.{i}.", "model.layers.{i}."),
)

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
        "architectures": [_ARCH["bloom"]],
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


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    h = cfg.attention.n_heads
    state = _RENAMES.state_from_hf({name.removeprefix("transformer."): t for name, t in state.items()})
    return unfuse(state, QKV, QKV_PARTS, lambda _, t: split_qkv_per_head(t, h))


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> StateDict:
    h = cfg.attention.n_heads
    out = _RENAMES.state_to_hf(fuse(state, QKV_PARTS, QKV, lambda qkv: fuse_qkv_per_head(*qkv, h)))
    return {name if name == "lm_head.weight" else f"transformer.{name}": t for name, t in out.items()}


FAMILIES = families_by_type(_ARCH, _config_from_hf, _config_to_hf, _state_from_hf, _state_to_hf, ignored_keys=())
