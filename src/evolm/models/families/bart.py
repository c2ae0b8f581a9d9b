"""BART (Lewis et al., 2020, "BART: Denoising Sequence-to-Sequence Pre-training for Natural
Language Generation, Translation, and Comprehension").

An encoder-decoder (``evolm.models.seq2seq``) in fairseq's shape: post-LN blocks with LayerNorm,
biases everywhere, a plain GELU MLP, learned absolute positions whose table starts at row 2
(fairseq reserved the first rows for padding), a LayerNorm on embeddings plus positions
(``layernorm_embedding``), embeddings optionally scaled by sqrt(C) (``scale_embedding``), no final
norm, and a head tied to the shared embedding with a fixed bias ``final_logits_bias`` (evolm's
``lm_head.bias``).

Checkpoint layout (``{p}`` = ``encoder`` or ``decoder``):

=================================================  ===========================================
HF tensor                                          evolm tensor
=================================================  ===========================================
``model.shared``                                   ``model.embed_tokens``
``model.{p}.embed_positions`` (max + 2, C)         ``model.{p}.embed_positions``
``model.{p}.layernorm_embedding``                  ``model.{p}.embed_norm``
``model.{p}.layers.N.self_attn.{q,k,v}_proj``      ``model.{p}.layers.N.self_attn.{q,k,v}_proj``
``model.{p}.layers.N.self_attn.out_proj``          ``model.{p}.layers.N.self_attn.o_proj``
``model.{p}.layers.N.self_attn_layer_norm``        ``model.{p}.layers.N.self_attn_norm``
``model.decoder.layers.N.encoder_attn.*``          ``model.decoder.layers.N.cross_attn.*``
``model.decoder.layers.N.encoder_attn_layer_norm``  ``model.decoder.layers.N.cross_attn_norm``
``model.{p}.layers.N.fc1`` / ``fc2``               ``model.{p}.layers.N.mlp.up_proj`` / ``down_proj``
``model.{p}.layers.N.final_layer_norm``            ``model.{p}.layers.N.mlp_norm``
``final_logits_bias`` (1, V)                       ``lm_head.bias`` (V,)
=================================================  ===========================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from evolm.errors import ConfigError
from evolm.models.family import Family, StateDict
from evolm.models.hf_config import activation_from_hf, activation_to_hf, need
from evolm.models.renames import Renames
from evolm.models.seq2seq import Seq2SeqConfig, Seq2SeqLM
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig

_OFFSET = 2  # BartLearnedPositionalEmbedding: position p reads row p + 2


def _renames() -> Renames:
    pairs: list[tuple[str, str]] = [("model.shared.", "model.embed_tokens.")]
    for p in ("encoder", "decoder"):
        hf, ev = f"model.{p}.layers.{{i}}.", f"model.{p}.layers.{{i}}."
        pairs += [
            (f"model.{p}.layernorm_embedding.", f"model.{p}.embed_norm."),
            (f"{hf}self_attn.out_proj.", f"{ev}self_attn.o_proj."),
            (f"{hf}self_attn_layer_norm.", f"{ev}self_attn_norm."),
            (f"{hf}encoder_attn.out_proj.", f"{ev}cross_attn.o_proj."),
            (f"{hf}encoder_attn_layer_norm.", f"{ev}cross_attn_norm."),
            (f"{hf}encoder_attn.", f"{ev}cross_attn."),
            (f"{hf}fc1.", f"{ev}mlp.up_proj."),
            (f"{hf}fc2.", f"{ev}mlp.down_proj."),
            (f"{hf}final_layer_norm.", f"{ev}mlp_norm."),
        ]
    return Renames(*pairs)


_RENAMES = _renames()


def _config_from_hf(hf: dict) -> Seq2SeqConfig:
    c = int(need(hf, "d_model"))
    heads = int(need(hf, "encoder_attention_heads"))
    ffn = int(need(hf, "encoder_ffn_dim"))
    if int(hf.get("decoder_attention_heads", heads)) != heads or int(hf.get("decoder_ffn_dim", ffn)) != ffn:
        raise ConfigError(
            f"bart with encoder/decoder heads {heads}/{hf.get('decoder_attention_heads')} and ffn dims "
            f"{ffn}/{hf.get('decoder_ffn_dim')}: evolm's encoder-decoder uses one shape for both stacks"
        )
    if c % heads:
        raise ConfigError(f"d_model={c} is not a multiple of encoder_attention_heads={heads}")
    if hf.get("tie_word_embeddings", True) is False:
        raise ConfigError("bart with tie_word_embeddings=false is not supported (BART's head is the embedding)")
    return Seq2SeqConfig(
        family="bart",
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "encoder_layers")),
        n_decoder_layers=int(need(hf, "decoder_layers")),
        max_seq_len=int(need(hf, "max_position_embeddings")),
        attention=AttentionConfig(
            n_heads=heads, n_kv_heads=heads, head_dim=c // heads, qkv_bias=True, out_bias=True, position="none"
        ),
        mlp=MLPConfig(
            hidden_size=ffn,
            gated=False,
            activation=activation_from_hf(hf.get("activation_function", "gelu")),
            bias=True,
        ),
        norm=NormConfig(kind="layernorm", eps=1e-5),  # torch.nn.LayerNorm's default
        residual="post",
        absolute_positions="learned",
        position_offset=_OFFSET,
        embedding_scale=math.sqrt(c) if hf.get("scale_embedding", False) else None,
        embedding_norm=True,
        final_norm=False,
        tie_embeddings=True,
        lm_head_bias=True,
        decoder_start_token_id=int(hf.get("decoder_start_token_id", 2)),
        pad_token_id=hf.get("pad_token_id", 1),
        eos_token_id=hf.get("eos_token_id", 2),
        extra=tuple((k, hf[k]) for k in ("bos_token_id", "forced_eos_token_id") if k in hf),
    )


def _config_to_hf(cfg: Seq2SeqConfig) -> dict:
    a = cfg.attention
    return {
        "model_type": "bart",
        "architectures": ["BartForConditionalGeneration"],
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "encoder_layers": cfg.n_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "encoder_attention_heads": a.n_heads,
        "decoder_attention_heads": a.n_heads,
        "encoder_ffn_dim": cfg.mlp.hidden_size,
        "decoder_ffn_dim": cfg.mlp.hidden_size,
        "activation_function": activation_to_hf(cfg.mlp.activation, "gelu_new"),
        "max_position_embeddings": cfg.max_seq_len,
        "scale_embedding": cfg.embedding_scale is not None,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        **dict(cfg.extra),
    }


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: Seq2SeqConfig) -> StateDict:
    out = _RENAMES.state_from_hf(state)
    bias = out.pop("final_logits_bias", None)
    out["lm_head.bias"] = bias[0] if bias is not None else torch.zeros(cfg.vocab_size)  # (1, V) -> (V,)
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: Seq2SeqConfig) -> StateDict:
    out = _RENAMES.state_to_hf(state)
    out["final_logits_bias"] = out.pop("lm_head.bias")[None]  # (V,) -> (1, V)
    return out


FAMILIES = {
    "bart": Family(
        name="bart",
        model_types=("bart",),
        architecture="BartForConditionalGeneration",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
        # tied copies of model.shared some checkpoints store, and fairseq's version counters
        ignored_keys=(
            "model.encoder.embed_tokens.weight",
            "model.decoder.embed_tokens.weight",
            "encoder.version",
            "decoder.version",
        ),
        build=Seq2SeqLM,
    )
}
