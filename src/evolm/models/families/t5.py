"""T5 (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer") and T5 v1.1 / Flan-T5 (Chung et al., 2022).

An encoder-decoder (``evolm.models.seq2seq``) with pre-LN blocks, RMSNorm without bias (T5's
"LayerNorm" subtracts no mean), no biases anywhere, unscaled attention scores (``scale=1``: the
1/sqrt(D) is folded into the initialisation) and a bucketed relative position bias learned by the
first layer of each stack and shared by all of its layers; no absolute positions.

* v1.0: ReLU MLP (``feed_forward_proj="relu"``), head tied to the embedding, decoder output
  scaled by ``C ** -0.5`` before it.
* v1.1: gated-GELU MLP (GeGLU, ``"gated-gelu"``), untied head, no output scaling.

transformers 5 always sets ``tie_word_embeddings=True`` on T5 configs and records v1.0's output
scaling as ``scale_decoder_outputs``; a checkpoint without ``lm_head.weight`` shares the
embedding. evolm reads the scaling as the version: scaled models tie the head, unscaled ones get
their own (a copy of the embedding when the file has none).

Checkpoint layout (``{p}`` = ``encoder`` or ``decoder``; the decoder's block has the
cross-attention at ``layer.1`` and the MLP at ``layer.2``):

===========================================================  ======================================
HF tensor                                                    evolm tensor
===========================================================  ======================================
``shared``                                                   ``model.embed_tokens``
``{p}.block.0.layer.0.SelfAttention.relative_attention_bias``  ``model.{p}.relative_bias.embedding``
``{p}.block.N.layer.0.SelfAttention.{q,k,v,o}``              ``model.{p}.layers.N.self_attn.{q,k,v,o}_proj``
``{p}.block.N.layer.0.layer_norm``                           ``model.{p}.layers.N.self_attn_norm``
``decoder.block.N.layer.1.EncDecAttention.{q,k,v,o}``        ``model.decoder.layers.N.cross_attn.{q,k,v,o}_proj``
``decoder.block.N.layer.1.layer_norm``                       ``model.decoder.layers.N.cross_attn_norm``
``{p}.block.N.layer.M.DenseReluDense.{wi,wi_0,wi_1,wo}``     ``...mlp.{up,gate,up,down}_proj``
``{p}.block.N.layer.M.layer_norm`` (M = last)                ``model.{p}.layers.N.mlp_norm``
``{p}.final_layer_norm``                                     ``model.{p}.norm``
===========================================================  ======================================
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from evolm.errors import CheckpointError, ConfigError
from evolm.models.family import Family, StateDict
from evolm.models.hf_config import activation_from_hf, need
from evolm.models.renames import Renames
from evolm.models.seq2seq import Seq2SeqConfig, Seq2SeqLM
from evolm.nn.mlp import MLPConfig
from evolm.nn.norm import NormConfig
from evolm.nn.self_attention import AttentionConfig


def _renames(gated: bool) -> Renames:
    """The name table; ``up_proj`` is ``wi_1`` in a gated MLP and ``wi`` in a plain one."""
    mlp = (("wi_0", "gate_proj"), ("wi_1", "up_proj")) if gated else (("wi", "up_proj"),)
    pairs: list[tuple[str, str]] = [("shared.", "model.embed_tokens.")]
    for p in ("encoder", "decoder"):
        pairs.append(
            (f"{p}.block.0.layer.0.SelfAttention.relative_attention_bias.", f"model.{p}.relative_bias.embedding.")
        )
        blocks = [("layer.0.SelfAttention", "self_attn")]
        if p == "decoder":
            blocks.append(("layer.1.EncDecAttention", "cross_attn"))
        for hf_mod, ev_mod in blocks:
            for proj in "qkvo":
                pairs.append((f"{p}.block.{{i}}.{hf_mod}.{proj}.", f"model.{p}.layers.{{i}}.{ev_mod}.{proj}_proj."))
            norm_at = hf_mod.split(".")[0] + "." + hf_mod.split(".")[1]  # "layer.0" / "layer.1"
            pairs.append((f"{p}.block.{{i}}.{norm_at}.layer_norm.", f"model.{p}.layers.{{i}}.{ev_mod}_norm."))
        ff = "layer.2" if p == "decoder" else "layer.1"
        for hf_lin, ev_lin in (*mlp, ("wo", "down_proj")):
            pairs.append((f"{p}.block.{{i}}.{ff}.DenseReluDense.{hf_lin}.", f"model.{p}.layers.{{i}}.mlp.{ev_lin}."))
        pairs.append((f"{p}.block.{{i}}.{ff}.layer_norm.", f"model.{p}.layers.{{i}}.mlp_norm."))
        pairs.append((f"{p}.final_layer_norm.", f"model.{p}.norm."))
    return Renames(*pairs)


_RENAMES = {gated: _renames(gated) for gated in (False, True)}


def _mlp_from_hf(hf: dict) -> MLPConfig:
    proj = str(hf.get("feed_forward_proj", "relu"))
    parts = proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ConfigError(f"feed_forward_proj={proj!r}; expected 'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')")
    gated = len(parts) == 2
    # transformers maps "gated-gelu" to the tanh GELU (gelu_new), other names to ACT2FN[ACT]
    activation = "gelu_tanh" if proj == "gated-gelu" else activation_from_hf(parts[-1])
    return MLPConfig(hidden_size=int(need(hf, "d_ff")), gated=gated, activation=activation, bias=False)


def _config_from_hf(hf: dict) -> Seq2SeqConfig:
    c = int(need(hf, "d_model"))
    n_heads = int(need(hf, "num_heads"))
    n_layers = int(need(hf, "num_layers"))
    scaled = hf.get("scale_decoder_outputs")
    if scaled is None:  # configs written before transformers 5: v1.1 says tie_word_embeddings=false
        scaled = hf.get("tie_word_embeddings", True) is not False
    pad = hf.get("pad_token_id", 0)
    start = hf.get("decoder_start_token_id")
    return Seq2SeqConfig(
        family="t5",
        vocab_size=int(need(hf, "vocab_size")),
        hidden_size=c,
        n_layers=n_layers,
        n_decoder_layers=int(hf.get("num_decoder_layers") or n_layers),
        max_seq_len=int(hf.get("n_positions", 512)),
        attention=AttentionConfig(
            n_heads=n_heads, n_kv_heads=n_heads, head_dim=int(hf.get("d_kv", c // n_heads)), scale=1.0, position="none"
        ),
        mlp=_mlp_from_hf(hf),
        norm=NormConfig(kind="rmsnorm", eps=float(hf.get("layer_norm_epsilon", 1e-6))),
        residual="pre",
        absolute_positions="none",
        final_norm=True,
        tie_embeddings=bool(scaled),
        output_scale=c**-0.5 if scaled else None,
        relative_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        decoder_start_token_id=int(start if start is not None else (pad if pad is not None else 0)),
        pad_token_id=pad,
        eos_token_id=hf.get("eos_token_id", 1),
    )


def _config_to_hf(cfg: Seq2SeqConfig) -> dict:
    a, m = cfg.attention, cfg.mlp
    if m.gated:
        proj = "gated-gelu" if m.activation == "gelu_tanh" else f"gated-{m.activation}"
    else:
        proj = {"gelu_tanh": "gelu_new"}.get(m.activation, m.activation)
    return {
        "model_type": "t5",
        "architectures": ["T5ForConditionalGeneration"],
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size,
        "d_kv": a.head_dim,
        "d_ff": m.hidden_size,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.n_decoder_layers,
        "num_heads": a.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm.eps,
        "feed_forward_proj": proj,
        "n_positions": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.output_scale is not None,
        "is_encoder_decoder": True,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
    }


def _check(cfg: Seq2SeqConfig) -> None:
    a = cfg.attention
    if cfg.family != "t5" or cfg.residual != "pre" or a.n_kv_heads != a.n_heads or a.qkv_bias or a.out_bias:
        raise ConfigError("a t5 config is pre-LN multi-head attention without biases")
    if (cfg.output_scale is not None) != cfg.tie_embeddings:
        raise ConfigError(
            "t5 ties the head exactly when it scales the decoder output (v1.0) and unties it otherwise (v1.1); "
            f"got tie_embeddings={cfg.tie_embeddings}, output_scale={cfg.output_scale}"
        )


def _state_from_hf(state: Mapping[str, torch.Tensor], cfg: Seq2SeqConfig) -> StateDict:
    out = _RENAMES[cfg.mlp.gated].state_from_hf(state)
    head, emb = out.get("lm_head.weight"), out.get("model.embed_tokens.weight")
    if cfg.tie_embeddings:
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise CheckpointError(
                "this t5 config scales the decoder output (v1.0: head tied to the embedding) but the checkpoint "
                "has an lm_head.weight that differs from shared.weight"
            )
    elif head is None and emb is not None:
        out["lm_head.weight"] = emb.clone()  # transformers ties a head the file does not store
    return out


def _state_to_hf(state: Mapping[str, torch.Tensor], cfg: Seq2SeqConfig) -> StateDict:
    _check(cfg)
    return _RENAMES[cfg.mlp.gated].state_to_hf(state)


FAMILIES = {
    "t5": Family(
        name="t5",
        model_types=("t5",),
        architecture="T5ForConditionalGeneration",
        config_from_hf=_config_from_hf,
        config_to_hf=_config_to_hf,
        state_from_hf=_state_from_hf,
        state_to_hf=_state_to_hf,
        # tied copies some checkpoints store, and a bias transformers ignores
        ignored_keys=(
            "encoder.embed_tokens.weight",
            "decoder.embed_tokens.weight",
            "EncDecAttention.relative_attention_bias.weight",
        ),
        build=Seq2SeqLM,
    )
}
