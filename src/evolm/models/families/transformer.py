"""The original Transformer (Vaswani et al., 2017, "Attention Is All You Need") as an evolm family.

An encoder-decoder (``evolm.models.seq2seq``) with post-LN blocks (``LayerNorm(x + f(x))``),
ReLU feed-forward layers, fixed sinusoidal positions added to token embeddings scaled by
sqrt(d_model) (section 3.4), and one weight matrix shared by the encoder embedding, the decoder
embedding and the pre-softmax projection. Linear layers carry biases, as in the fairseq and
tensor2tensor implementations. Dropout is left to the training recipe.

There is no Hugging Face counterpart, so checkpoints use evolm's own ``config.json`` (fields
below, ``model_type: "transformer"``) and evolm's tensor names unchanged: ``save_model`` then
``load_model`` round-trips; transformers does not read them.
"""

from __future__ import annotations

import math
from typing import Any

from evolm.errors import ConfigError
from evolm.models.family import Family
from evolm.models.hf_config import activation_from_hf, need
from evolm.models.seq2seq import Seq2SeqConfig, Seq2SeqLM
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig


def _config_from_hf(hf: dict) -> Seq2SeqConfig:
    c = int(need(hf, "d_model"))
    heads = int(need(hf, "num_heads"))
    if c % heads:
        raise ConfigError(f"d_model={c} is not a multiple of num_heads={heads}")
    return Seq2SeqConfig(
        family="transformer",
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=int(need(hf, "encoder_layers")),
        n_decoder_layers=int(need(hf, "decoder_layers")),
        max_seq_len=int(need(hf, "max_position_embeddings")),
        attention=AttentionConfig(
            n_heads=heads, n_kv_heads=heads, head_dim=c // heads, qkv_bias=True, out_bias=True, position="none"
        ),
        mlp=MLPConfig(
            hidden_size=int(need(hf, "d_ff")),
            gated=False,
            activation=activation_from_hf(hf.get("activation", "relu")),
            bias=True,
        ),
        norm=NormConfig(kind="layernorm", eps=float(hf.get("layer_norm_eps", 1e-5))),
        residual="post",
        absolute_positions="sinusoidal",
        embedding_scale=math.sqrt(c),
        final_norm=False,
        tie_embeddings=True,
        decoder_start_token_id=int(hf.get("decoder_start_token_id", 0)),
        pad_token_id=hf.get("pad_token_id"),
        eos_token_id=hf.get("eos_token_id"),
    )


def _config_to_hf(cfg: Seq2SeqConfig) -> dict[str, Any]:
    return {
        "model_type": "transformer",
        "architectures": ["Transformer2017"],
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "encoder_layers": cfg.n_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "num_heads": cfg.attention.n_heads,
        "d_ff": cfg.mlp.hidden_size,
        "activation": cfg.mlp.activation,
        "max_position_embeddings": cfg.max_seq_len,
        "layer_norm_eps": cfg.norm.eps,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


FAMILIES = {
    "transformer": Family(
        name="transformer",
        model_types=("transformer",),
        architecture="Transformer2017",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        build=Seq2SeqLM,
    )
}
